"""LLaVA-OneVision import: a tiny random transformers LlavaOnevisionForConditionalGeneration
(SigLIP tower, 2-layer GELU projector, Qwen2 LM) against our VisorLVLM, the converter round
trip, and the import's errors."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from src.import_llava_ov import convert, load_converted, main  # noqa: E402
from src.models.hf_import import HFImportError  # noqa: E402
from src.models.llava_ov import current_layout_name, llava_ov_from_hf, llava_ov_settings  # noqa: E402
from src.models.plan import LayerPlan  # noqa: E402

VOCAB, IMAGE_TOKEN = 90, 89
IMAGE, PATCH = 32, 8
V = (IMAGE // PATCH) ** 2  # 16 patch tokens, no CLS


def tiny_config(**overrides):
    text = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                    tie_word_embeddings=overrides.pop("tied", False))
    vision = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=2, image_size=IMAGE, patch_size=PATCH, vision_use_head=False)
    return transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text.to_dict(),
                                             image_token_index=IMAGE_TOKEN, **overrides)


def tiny_hf(seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.LlavaOnevisionForConditionalGeneration(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():  # no parameter left at a trivial init (biases, gains, newline)
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_single_crop_logits(model, images, text_ids):
    """transformers' logits for [image tokens (V + 1); text] with one crop per image.

    Single-crop features come from LLaVA-OV's multi-image path (batch_num_images > 1: one crop
    per image, then image_newline); a one-image call would tile it (AnyRes). So the features of
    `images` (B=1) are computed in a two-image call and placed at the image-token positions by
    transformers' own forward. pixel_values are normalised as the processor does (mean = std = 0.5)."""
    pix = (torch.cat([images, images.flip(-1)]) - 0.5) / 0.5  # (2, 3, S, S), a second distinct image
    sizes = torch.tensor([[IMAGE, IMAGE]] * 2)
    feats = model.model.get_image_features(pix, sizes, batch_num_images=torch.tensor([2])).pooler_output
    assert feats[0].shape == (V + 1, 32), feats[0].shape  # V patch tokens + image_newline
    ids = torch.cat([torch.full((1, V + 1), IMAGE_TOKEN), text_ids], dim=1)  # image first, no text before
    out = model(input_ids=ids, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats[0]])})
    return out.logits[:, V + 1:], feats[0]  # the text positions (B, T, vocab), features (V + 1, d)


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_ov")
    hf_model.save_pretrained(str(folder))
    return folder


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, IMAGE, IMAGE, generator=g), torch.randint(0, IMAGE_TOKEN, (1, 7), generator=g)


@pytest.mark.parametrize("pos_conv", [False, True])
def test_logits_match_transformers(hf_model, hf_dir, pos_conv):
    """All-self plan: the imported model is LLaVA-OV (pos conv zero-initialised: the identity)."""
    ours, settings = llava_ov_from_hf(hf_dir, pos_conv=pos_conv)
    assert settings["vision"]["depth"] == 3 and ours.num_visual_tokens == V + 1
    images, text = inputs()
    with torch.no_grad():
        ref, ref_feats = hf_single_crop_logits(hf_model, images, text)
        visual, positions = ours.encode_images(images)[:2]  # tokens, positions
        logits = ours(images, text)  # (1, T, vocab)
    assert positions is None and visual.shape == (1, V + 1, 32)
    torch.testing.assert_close(visual[0], ref_feats, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


LEGACY = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
          "model.vision_tower.": "vision_tower.vision_model.", "model.multi_modal_projector.": "multi_modal_projector.",
          "model.image_newline": "image_newline"}


@pytest.mark.parametrize("layout", ["current", "hub"])
def test_feature_layer_and_layouts(tmp_path, layout):
    """vision_feature_layer=-2 (the tower cut one layer early; its last layer and post-layernorm are
    documented drops), tied embeddings, and both tensor layouts: the in-memory transformers-5 names
    (`model.language_model.*`, `model.vision_tower.*`) and the llava-hf hub names
    (`language_model.model.*`, `vision_tower.vision_model.*`, `image_newline`). (save_pretrained
    itself writes a third: hub names without `vision_model.`, read by the other tests.)"""
    model = tiny_hf(seed=3, vision_feature_layer=-2, tied=True)
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: dropped
    if layout == "hub":
        renamed = {}
        for k, v in state.items():
            new = next(old + k[len(cur):] for cur, old in LEGACY.items() if k.startswith(cur))
            assert current_layout_name(new) == k
            renamed[new] = v
        assert "vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight" in renamed
        state = renamed
    path.unlink()
    save_file(state, str(path), metadata={"format": "pt"})
    ours, settings = llava_ov_from_hf(tmp_path)
    assert settings["vision"]["depth"] == 2 and len(ours.vision.vit.blocks) == 2 and settings["tied"]
    images, text = inputs(seed=2)
    with torch.no_grad():
        ref, _ = hf_single_crop_logits(model, images, text)
        torch.testing.assert_close(ours(images, text), ref, atol=1e-4, rtol=0)


def test_visor_plan_init(hf_dir):
    """A VISOR plan: cross sublayers copied from their host attention, pos conv zero, gates zero."""
    ours, _ = llava_ov_from_hf(hf_dir, plan=LayerPlan(n_layers=2, self_layers=[0], cross_layers=[1]), pos_conv=True)
    cross, host = ours.decoder.cross["1"], ours.decoder.layers[1]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(cross, name).weight, getattr(host.attn, name).weight)
    assert torch.equal(cross.norm_visual.weight, host.input_norm.weight)
    assert float(cross.gate.detach()) == 0.0
    assert not ours.pos_conv.conv.weight.any() and not ours.pos_conv.conv.bias.any()
    images, text = inputs()
    with torch.no_grad():
        assert torch.isfinite(ours(images, text)).all()


def test_convert_round_trip(hf_model, hf_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    main(["--hf-dir", str(hf_dir), "--out", str(out), "--dtype", "float32"])
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lvlm_init_args"]["vision"]["init_args"]["depth"] == 3
    assert manifest["image_token_index"] == IMAGE_TOKEN and manifest["source"]["config"]["model_type"] == "llava_onevision"
    stored = load_file(str(out / "model.safetensors"))
    assert "image_newline" in stored and not any(k.startswith(("pos_conv.", "decoder.cross.")) for k in stored)
    ours = load_converted(out)
    images, text = inputs()
    with torch.no_grad():
        ref, _ = hf_single_crop_logits(hf_model, images, text)
        torch.testing.assert_close(ours(images, text), ref, atol=1e-4, rtol=0)
    # The base loads into a VISOR model: cross from host, pos conv new.
    visor = load_converted(out, plan=LayerPlan(n_layers=2, self_layers=[0], cross_layers=[1]), pos_conv=True)
    assert torch.equal(visor.decoder.cross["1"].q_proj.weight, visor.decoder.layers[1].attn.q_proj.weight)
    with pytest.raises(ValueError, match="--dtype"):
        convert(hf_dir, tmp_path / "x", dtype="int8")


def test_convert_keeps_the_source_dtype_by_default(hf_model, tmp_path):
    """The published checkpoint is float16: the default stores float16, bit for bit, not a lossy bfloat16."""
    import copy

    half_dir = tmp_path / "hf_half"
    copy.deepcopy(hf_model).to(torch.float16).save_pretrained(str(half_dir))
    manifest = convert(half_dir, tmp_path / "converted")
    assert manifest["dtype"] == "float16"
    stored = load_file(str(tmp_path / "converted" / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    source = hf_model.model.language_model.layers[0].self_attn.q_proj.weight.detach().half()
    assert torch.equal(stored["decoder.layers.0.attn.q_proj.weight"], source)


def test_anyres_input_rejected(hf_dir):
    ours, _ = llava_ov_from_hf(hf_dir)
    with pytest.raises(ValueError, match="TiledImages"):
        ours(torch.rand(1, 2, 3, IMAGE, IMAGE), torch.zeros(1, 3, dtype=torch.long))


# --- failures ----------------------------------------------------------------------------------


def edited_copy(hf_dir, tmp_path, fn):
    """The checkpoint with tensor names in the current layout, edited by fn(state)."""
    state = {current_layout_name(k): v for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    fn(state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    return tmp_path


def test_missing_tensor_is_named(hf_dir, tmp_path):
    folder = edited_copy(hf_dir, tmp_path, lambda s: s.pop("model.vision_tower.encoder.layers.1.self_attn.v_proj.bias"))
    with pytest.raises(HFImportError, match=r"missing.*model\.vision_tower\.encoder\.layers\.1\.self_attn\.v_proj\.bias"):
        llava_ov_from_hf(folder)


def test_misshaped_tensor_is_named(hf_dir, tmp_path):
    folder = edited_copy(hf_dir, tmp_path, lambda s: s.update({"model.multi_modal_projector.linear_1.weight": torch.zeros(32, 20)}))
    with pytest.raises(HFImportError, match=r"mis-shaped.*model\.multi_modal_projector\.linear_1\.weight \(32, 20\)"):
        llava_ov_from_hf(folder)


def test_misshaped_fused_qkv_is_named(hf_dir, tmp_path):
    folder = edited_copy(hf_dir, tmp_path, lambda s: s.update({"model.vision_tower.encoder.layers.0.self_attn.k_proj.weight": torch.zeros(12, 24)}))
    with pytest.raises(HFImportError, match=r"mis-shaped.*layers\.0\.self_attn\.k_proj\.weight \(12, 24\).*vision\.vit\.blocks\.0\.attn\.qkv\.weight"):
        llava_ov_from_hf(folder)


def test_unexpected_tensor_is_named(hf_dir, tmp_path):
    folder = edited_copy(hf_dir, tmp_path, lambda s: s.update({"model.video_newline": torch.zeros(32)}))
    with pytest.raises(HFImportError, match=r"unexpected.*model\.video_newline"):
        llava_ov_from_hf(folder)


@pytest.mark.parametrize("override, field", [
    (dict(vision_feature_select_strategy="default"), "vision_feature_select_strategy"),
    (dict(vision_feature_layer=[-2, -1]), "vision_feature_layer"),
    (dict(vision_feature_layer=-9), "vision_feature_layer"),
    (dict(projector_hidden_act="relu"), "projector_hidden_act"),
    (dict(multimodal_projector_bias=False), "multimodal_projector_bias"),
    (dict(vision_config={"model_type": "clip_vision_model"}), "vision_config.model_type"),
    (dict(text_config={"model_type": "qwen2", "hidden_act": "gelu"}), "text_config.hidden_act"),
    (dict(text_config={"model_type": "qwen2", "rope_scaling": {"type": "dynamic", "factor": 2.0}}), "text_config.rope_scaling"),
])
def test_unsupported_config_names_the_field(hf_dir, override, field):
    cfg = json.loads((hf_dir / "config.json").read_text())
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    with pytest.raises(ValueError, match=f"config.json.{field}"):
        llava_ov_settings(cfg)


def test_pooling_head_is_a_documented_drop(tmp_path):
    """A SigLIP tower saved with its pooling head (vision_use_head) loads: LLaVA-OV never runs it."""
    torch.manual_seed(5)
    cfg = tiny_config()
    cfg.vision_config.vision_use_head = True
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(tmp_path))
    assert any(".head." in k for k in load_file(str(tmp_path / "model.safetensors")))
    ours, _ = llava_ov_from_hf(tmp_path)
    images, text = inputs()
    with torch.no_grad():
        ref, _ = hf_single_crop_logits(model, images, text)
        torch.testing.assert_close(ours(images, text), ref, atol=1e-4, rtol=0)


def test_flops_count_the_newline(hf_dir):
    from src.flops import llm_flops, sample_flops

    ours, _ = llava_ov_from_hf(hf_dir)
    f = sample_flops(ours, T=7)
    assert f.llm == llm_flops(ours.decoder.config, ours.plan.kinds, V + 1, 7) and f.vision > 0


def test_config_yaml_matches_the_converter():
    """configs/llava_ov_0.5b.yaml describes what the converter builds from LLaVA-OV-0.5B's config
    (its published dimensions, written out here, vocabulary 152000 included; should the real file differ,
    loading the converted checkpoint fails naming the config fields to set)."""
    import yaml
    from pathlib import Path

    cfg = {"model_type": "llava_onevision", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                             "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                             "vision_use_head": False},
           "text_config": {"model_type": "qwen2", "vocab_size": 152000, "hidden_size": 896, "intermediate_size": 4864,
                           "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                           "use_sliding_window": False, "sliding_window": 32768}}
    s = llava_ov_settings(cfg)
    y = yaml.safe_load((Path(__file__).parents[2] / "configs" / "llava_ov_0.5b.yaml").read_text())
    init = y["model"]["init_args"]["lvlm"]["init_args"]
    assert {**init["vision"]["init_args"], "image_size": y["data"]["init_args"]["image_size"],
            "mean": None, "std": None} == {**s["vision"], "mean": None, "std": None}
    from src.models.decoder import DecoderConfig

    assert DecoderConfig(**init["decoder"]) == s["decoder"]
    assert init["plan"]["n_layers"] == s["decoder"].n_layers and init["image_newline"] is True
    # configs/anyres.yaml: the AnyRes settings the converter reads from the same config.json (its
    # image_grid_pinpoints left out there, as LlavaOnevisionConfig's default: LLaVA-OV's 36 canvases)
    from src.models.anyres import AnyRes

    delta = yaml.safe_load((Path(__file__).parents[2] / "configs" / "anyres.yaml").read_text())
    assert AnyRes(**delta["model"]["lvlm"]["init_args"]["anyres"]) == AnyRes(**s["anyres"])
    assert delta["data"]["anyres"] is True
