"""experiments/bench/bench_e2e.py end to end on a narrow Qwen2 (24 layers as the real plans need, d 64):
every row runs, the report has every section, and transformers' logits equal ours on its prefill."""
import re
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("image_at", [0, 3])  # 3: LLaVA-OV's chat layout, the image after `<|im_start|>user\n`
def test_bench_e2e_runs_every_row_on_a_narrow_qwen2(tmp_path, monkeypatch, image_at):
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=24,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen2")
    from experiments.bench import bench_e2e
    out = tmp_path / "bench.md"
    monkeypatch.setattr(sys, "argv", ["bench_e2e.py", "--hf-dir", str(tmp_path / "qwen2"), "--visual", "730",
                                      "--text", "8", "--repeats", "1", "--decode-batches", "1,3",
                                      "--decode-tokens", "1", "--image-at", str(image_at), "--out", str(out)])
    bench_e2e.main()
    text = out.read_text()
    for row in ("full", "llava_ov", "lean", "zero_self", "pool2", "visionzip25", "fastv50", "transformers"):
        assert f"| 730 | {row} |" in text and f"| 730 | 3 | {row} |" in text, row
    for row in ("full", "llava_ov", "lean", "llava_ov+emb"):
        assert f"| 730 | {row} |" in text.split("## Training step")[1], row
    peer = re.search(r"\| 730 \| transformers \|.*\| ([0-9.e+-]+) \|\n", text).group(1)
    assert float(peer) < 1e-4  # the peer's prefill logits equal ours
    assert out.with_suffix(".json").exists()
