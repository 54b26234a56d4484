"""At a real model's size: random weights at Qwen2-0.5B's configuration (LLaVA-OneVision-0.5B's LLM),
saved by `transformers` and loaded through our import path (src/models/hf_import.py), so the real
vocabulary (151936), GQA 14/2 heads, rope theta 1e6 and tied head go through the one decoder path.
About 2 minutes on 2 CPU cores: `slow` (run with `pytest -m slow`, or `make test-all`)."""
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    from src.models.decoder import PRESETS
    p = PRESETS["qwen2-0.5b"]
    cfg = transformers.Qwen2Config(vocab_size=p["vocab_size"], hidden_size=p["d_model"],
                                   intermediate_size=p["intermediate_size"], num_hidden_layers=p["n_layers"],
                                   num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"],
                                   rope_theta=p["rope_theta"], rms_norm_eps=p["norm_eps"], tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qwen2-0.5b")
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


def _inputs(V=40, T=12, B=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, V, 896, generator=g) * 0.02, torch.randint(0, 151936, (B, T), generator=g)


@torch.no_grad()
def test_cached_prefill_and_decode_equal_transformers_at_real_size(qwen2_folder):
    """All-self plan: our prefill (through the cache) and two decode steps give transformers' logits."""
    from src.models.generation import decode_step
    from src.models.hf_import import decoder_from_hf
    from src.models.kv_cache import KVCache
    dec = decoder_from_hf(qwen2_folder)
    assert dec.config.vocab_size == 151936 and dec.lm_head.weight is dec.embed_tokens.weight
    ref = transformers.AutoModelForCausalLM.from_pretrained(qwen2_folder, attn_implementation="sdpa").eval()
    visual, ids = _inputs()
    B, V, T = visual.shape[0], visual.shape[1], ids.shape[1]
    cache = KVCache(torch.full((B,), V), torch.full((B,), T), capacity=T + 4)
    _, hidden, _ = dec.run_layers(visual, dec.embed_tokens(ids), 0, 24, dec.positions(V, T, ids.device), cache=cache)
    ours = dec.lm_head(dec.norm(hidden[:, -1]))
    out = ref(inputs_embeds=torch.cat([visual, ref.get_input_embeddings()(ids)], 1), use_cache=True)
    torch.testing.assert_close(ours, out.logits[:, -1], atol=2e-4, rtol=0)
    past, tok = out.past_key_values, ours.argmax(-1)
    for _ in range(2):
        mine = decode_step(SimpleNamespace(decoder=dec), cache, tok)
        theirs = ref(input_ids=tok[:, None], past_key_values=past, use_cache=True)
        past = theirs.past_key_values
        torch.testing.assert_close(mine, theirs.logits[:, -1], atol=2e-4, rtol=0)
        tok = mine.argmax(-1)


@torch.no_grad()
def test_visor_plan_cached_decode_equals_uncached_at_real_size(qwen2_folder):
    """configs/llava_ov_0.5b.yaml's plan (live cross gates): prefill + decode step equals the uncached
    forward over the longer sequence, and the visual cache is 24 / 10 times smaller than all-self's."""
    import yaml

    from src.models.generation import decode_step
    from src.models.hf_import import decoder_from_hf
    from src.models.kv_cache import KVCache
    from src.models.plan import LayerPlan
    plan = yaml.safe_load(open("configs/llava_ov_0.5b.yaml"))["model"]["init_args"]["lvlm"]["init_args"]["plan"]
    dec = decoder_from_hf(qwen2_folder, LayerPlan(**plan))
    for cross in dec.cross.values():
        torch.nn.init.constant_(cross.gate, 0.5)
    visual, ids = _inputs()
    B, V, T = visual.shape[0], visual.shape[1], ids.shape[1]
    cache = KVCache(torch.full((B,), V), torch.full((B,), T), capacity=T + 1)
    _, hidden, _ = dec.run_layers(visual, dec.embed_tokens(ids), 0, 24, dec.positions(V, T, ids.device), cache=cache)
    tok = dec.lm_head(dec.norm(hidden[:, -1])).argmax(-1)
    step = decode_step(SimpleNamespace(decoder=dec), cache, tok)
    longer = torch.cat([ids, tok[:, None]], 1)
    full, _ = dec(visual, dec.embed_tokens(longer))
    torch.testing.assert_close(step, dec.lm_head(full[:, -1]), atol=2e-4, rtol=0)
    per_token = 2 * 2 * 64 * 4  # K and V, 2 KV heads of 64, fp32
    assert cache.visual_bytes() == B * V * per_token * (len(plan["self_layers"]) + 8)
