"""Qwen2/Llama import from Hugging Face checkpoint folders: logits parity with transformers, and
every way a checkpoint can fail to fit (missing, mis-shaped, unexpected tensors; unsupported config)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from src.models.decoder import DecoderConfig  # noqa: E402
from src.models.hf_import import HFImportError, decoder_config_from_hf, decoder_from_hf  # noqa: E402
from src.models.plan import LayerPlan  # noqa: E402

VOCAB = 80


def tiny_hf(family: str, tied: bool, seed: int = 0, **overrides):
    """A tiny random Qwen2/Llama causal LM (GQA: 4 query heads, 2 kv heads), every parameter
    (biases and norm gains included) perturbed so that none is left at a trivial value."""
    torch.manual_seed(seed)
    C, M = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    cfg = C(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=tied, rope_theta=5000.0, rms_norm_eps=1e-5, **overrides)
    model = M(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path


def compare(model, folder):
    ours = decoder_from_hf(folder)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits  # (B, T, vocab)
        x = ours.embed_tokens(ids)  # (B, T, d)
        plain = ours.lm_head(ours.forward_plain(x))
        empty_visual, _ = ours(x[:, :0], x)  # zero visual tokens
        split, _ = ours(x[:, :3], x[:, 3:])  # the first 3 tokens as "visual", all-self plan
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.lm_head(empty_visual), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.lm_head(split), ref[:, 3:], atol=1e-4, rtol=0)
    return ours


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path, family, tied):
    model = tiny_hf(family, tied)
    ours = compare(model, save(model, tmp_path))
    c = ours.config
    assert (c.n_heads, c.n_kv_heads, c.tie_embeddings, c.qkv_bias) == (4, 2, tied, family == "qwen2")
    assert c.rope_theta == 5000.0 and c.norm_eps == 1e-5
    if tied:
        assert ours.lm_head.weight is ours.embed_tokens.weight


def test_sharded_checkpoint(tmp_path):
    model = tiny_hf("qwen2", tied=False)
    folder = save(model, tmp_path, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()
    compare(model, folder)


def test_cross_plan_copies_host_attention(tmp_path):
    """A VISOR plan on imported weights: cross sublayers start as copies of their host layer's
    attention (cross_init=host) with a zero gate."""
    folder = save(tiny_hf("qwen2", tied=True), tmp_path)
    dec = decoder_from_hf(folder, plan=LayerPlan(n_layers=2, self_layers=[0], cross_layers=[1]))
    cross, host = dec.cross["1"], dec.layers[1]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        torch.testing.assert_close(getattr(cross, name).weight, getattr(host.attn, name).weight, atol=0, rtol=0)
    torch.testing.assert_close(cross.q_proj.bias, host.attn.q_proj.bias, atol=0, rtol=0)
    assert float(cross.gate.detach()) == 0.0


# --- failures ----------------------------------------------------------------------------------


def edit_weights(folder, fn):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    folder = save(tiny_hf("qwen2", tied=False), tmp_path)
    edit_weights(folder, lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(HFImportError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        decoder_from_hf(folder)


def test_untied_checkpoint_without_lm_head_is_missing(tmp_path):
    folder = save(tiny_hf("llama", tied=False), tmp_path)
    edit_weights(folder, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(HFImportError, match=r"missing.*lm_head\.weight"):
        decoder_from_hf(folder)


def test_misshaped_tensor_is_named(tmp_path):
    folder = save(tiny_hf("llama", tied=True), tmp_path)
    edit_weights(folder, lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(40, 32)}))
    with pytest.raises(HFImportError, match=r"mis-shaped.*model\.layers\.0\.mlp\.up_proj\.weight \(40, 32\)"):
        decoder_from_hf(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = save(tiny_hf("qwen2", tied=True), tmp_path)
    edit_weights(folder, lambda s: s.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(32)}))
    with pytest.raises(HFImportError, match=r"unexpected.*model\.layers\.0\.self_attn\.o_proj\.bias"):
        decoder_from_hf(folder)


def test_tied_lm_head_must_equal_embedding(tmp_path):
    model = tiny_hf("qwen2", tied=True)
    folder = save(model, tmp_path)
    edit_weights(folder, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    compare(model, folder)  # a tied checkpoint that still stores an identical lm_head loads
    edit_weights(folder, lambda s: s.update({"lm_head.weight": torch.randn(VOCAB, 32)}))
    with pytest.raises(HFImportError, match="lm_head.weight differs from model.embed_tokens.weight"):
        decoder_from_hf(folder)


def test_nothing_loads_on_failure(tmp_path):
    """All or nothing: a failing import leaves a decoder it was given untouched."""
    from src.models.decoder import Decoder
    from src.models.hf_import import HFCheckpoint, load_hf_decoder_weights

    folder = save(tiny_hf("qwen2", tied=True), tmp_path)
    edit_weights(folder, lambda s: s.pop("model.norm.weight"))
    cfg = decoder_config_from_hf(json.loads((folder / "config.json").read_text()))
    dec = Decoder(cfg, LayerPlan(n_layers=2, all_self=True))
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    with pytest.raises(HFImportError, match=r"model\.norm\.weight"):
        load_hf_decoder_weights(dec, HFCheckpoint(folder), "qwen2")
    assert all(torch.equal(before[k], v) for k, v in dec.state_dict().items())


BASE = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("override, field", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_parameters.rope_type"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="llama", mlp_bias=True), "mlp_bias"),
    (dict(model_type="llama", attention_bias=True), "attention_bias"),
    (dict(model_type="llama", head_dim=16), "head_dim"),
    (dict(model_type="mistral"), "model_type"),
])
def test_unsupported_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=f"config.json.{field}"):
        decoder_config_from_hf({**BASE, **override})


def test_config_fields():
    c = decoder_config_from_hf({**BASE, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                                "rope_scaling": None, "sliding_window": 4096, "use_sliding_window": False})
    assert isinstance(c, DecoderConfig)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings, c.qkv_bias, c.n_kv_heads) == (1e6, 1e-5, True, True, 2)
    c = decoder_config_from_hf({**BASE, "model_type": "llama", "num_key_value_heads": None,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert (c.rope_theta, c.qkv_bias, c.n_kv_heads, c.tie_embeddings) == (500000.0, False, 4, False)
    with pytest.raises(ValueError, match="config.json.vocab_size is missing"):
        decoder_config_from_hf({k: v for k, v in BASE.items() if k != "vocab_size"})


def test_not_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        decoder_from_hf(tmp_path)
