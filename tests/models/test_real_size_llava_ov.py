"""LLaVA-OneVision at its real 0.5B configuration (SigLIP-so400m tower cut at layer 26, Qwen2-0.5B with
LLaVA-OV's 152000-row vocabulary), random weights saved by `transformers`, converted by
`python -m src.import_llava_ov`: logits against transformers at a multi-tile AnyRes image inside a
chat prompt (3 text tokens before the image, as `<|im_start|>user\n`), then
`fit` (2 steps) and `predict` under the shipped configs/llava_ov_0.5b.yaml (and its AnyRes delta),
overriding the paths and the run's length only. A stand-in tokenizer.json carries Qwen2's real
special-token ids. About 4.5 minutes and a 15.5 GB peak (RSS) on 2 CPU cores: `slow`."""
import json
import resource
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
QWEN2_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
IMAGE_TOKEN = 151646
WIDE = (300, 700)  # (H, W): a 1 x 2 tile grid
IMAGE_AT = 3  # text tokens before the image


def real_config():
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                  num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    text = transformers.Qwen2Config(vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
                                    rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768)
    return transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text.to_dict(), image_token_index=IMAGE_TOKEN,
                                             vision_feature_layer=-1, vision_feature_select_strategy="full",
                                             tie_word_embeddings=True)


def stand_in_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json over the generated data's words, with Qwen2's special tokens at their
    real ids (fillers in between), so ids, padding and the LM head see the real vocabulary's range."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from src.data.generator import vocabulary
    words = sorted(set(vocabulary()) | set("?.,:!'\n") | {"[UNK]", "user", "assistant", "system", "You", "are", "a",
                                                          "helpful", "assistant."})
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), min(QWEN2_SPECIAL.values()))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok.add_special_tokens(list(QWEN2_SPECIAL))
    assert all(tok.token_to_id(t) == i for t, i in QWEN2_SPECIAL.items())
    tok.save(str(path))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """-> (converted folder, tokenizer.json, transformers' logits and visual-token count at WIDE, text ids)."""
    root = tmp_path_factory.mktemp("llava_ov_real")
    torch.manual_seed(0)
    hf = transformers.LlavaOnevisionForConditionalGeneration(real_config()).eval()
    hf.save_pretrained(str(root / "hf"))
    proc = transformers.LlavaOnevisionImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = torch.randint(0, 256, (3, *WIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pix = proc(images=[image], return_tensors="pt")
    text = torch.randint(0, 151000, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        V = hf.model.get_image_features(pix["pixel_values"], pix["image_sizes"]).pooler_output[0].shape[0]
        ids = torch.cat([text[:, :IMAGE_AT], torch.full((1, V), IMAGE_TOKEN), text[:, IMAGE_AT:]], dim=1)
        ref = hf(input_ids=ids, pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"]).logits
        ref = torch.cat([ref[:, :IMAGE_AT], ref[:, IMAGE_AT + V:]], dim=1)  # the text positions
    del hf
    from src.import_llava_ov import main
    main(["--hf-dir", str(root / "hf"), "--out", str(root / "converted")])
    stand_in_tokenizer(root / "tokenizer.json")
    return root / "converted", root / "tokenizer.json", ref, V, image, text


def test_converted_anyres_logits_equal_transformers(real):
    from src.import_llava_ov import load_converted
    from src.models.anyres import TiledImages

    converted, _, ref, V, image, text = real
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["lvlm_init_args"]["decoder"]["vocab_size"] == 152000
    ours = load_converted(converted)
    assert ours.anyres.tile_grid(*WIDE) == (1, 2) and ours.anyres.num_tokens(*WIDE) == V
    tiled = TiledImages.stack([ours.anyres.crops(image)], [WIDE])
    with torch.no_grad():
        logits = ours(tiled, text, image_at=IMAGE_AT)
    diff = float((logits - ref).abs().max())
    print(f"\nAnyRes {WIDE[0]}x{WIDE[1]}: {V} visual tokens (transformers {V}) after {IMAGE_AT} text tokens; "
          f"max |logit diff| {diff:.2e}")
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("delta", [[], ["configs/anyres.yaml"]], ids=["crop", "anyres"])
def test_shipped_config_fits_and_predicts(real, tmp_path, monkeypatch, delta):
    """The documented commands, with the paths (checkpoint, tokenizer, data, outputs) and the run's
    length overridden; the AnyRes delta at 384 px renders (a base crop + 1 tile: 1485 tokens) and
    batch 1 to keep a CPU step short."""
    from src.cli import main

    converted, tokenizer, *_ = real
    monkeypatch.chdir(tmp_path)
    configs = ["--config", str(ROOT / "configs/llava_ov_0.5b.yaml")] + [a for c in delta for a in ("--config", str(ROOT / c))]
    common = ["--model.base_checkpoint", str(converted), "--data.tokenizer_path", str(tokenizer),
              "--data.root", str(tmp_path / "data"), "--data.train_images", "8", "--data.val_images", "2",
              "--data.images_per_shard", "8", "--data.num_workers", "0", "--data.batch_size", "1",
              "--data.val_batch_size", "2"] + (["--data.render_size", "384"] if delta else [])
    t0 = time.perf_counter()
    cli = main(["fit", *configs, *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                "--trainer.limit_val_batches", "1"])
    fit_s = time.perf_counter() - t0
    assert cli.trainer.global_step == 2 and (cli.model.lvlm.anyres is not None) == bool(delta)
    assert cli.datamodule.tokenizer.image_at > 0  # the shipped config's chat layout: the image inside the user turn
    ckpt = tmp_path / "last.ckpt"  # the run is shorter than the config's checkpoint interval
    cli.trainer.save_checkpoint(str(ckpt))
    out = tmp_path / "preds.jsonl"
    main(["predict", *configs, *common, "--ckpt_path", str(ckpt), "--trainer.limit_predict_batches", "1",
          "--model.max_new_tokens", "4", "--predict_writer.output_path", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(0 < len(r["generated_ids"]) <= 4 for r in rows)
    assert all(0 <= t < 152000 for r in rows for t in r["generated_ids"])
    print(f"\n{'anyres' if delta else 'crop'}: fit of 2 steps (+1 val batch) {fit_s:.1f} s, peak RSS so far "
          f"{peak_rss_gb():.1f} GB, first prediction {rows[0]['generated_ids']}, {rows[0]['gflops']:.1f} LLM GFLOPs")
