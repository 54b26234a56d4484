"""Cached generation (src/models/generation.py) against the uncached forward, sampling, eos, cache size."""
import pytest
import torch
from torch import nn

from src.models import FastVReducer, LayerPlan, VisionEncoder, VisorLVLM
from src.models.generation import generate, visual_kv_bytes, visual_kv_ratio

B, MAX_NEW = 4, 5


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster when another process
    keeps the cores busy (intra-op threads then spin against it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
PROMPT_LENS = [5, 3, 7, 1]  # right-padded to 7


def _model(tiny_decoder_config, plan, fastv=None, policy=False, seed=0, cross_rope=False):
    torch.manual_seed(seed)
    m = VisorLVLM(VisionEncoder("test_byobnet", 2, 64), tiny_decoder_config, plan, pos_conv=True,
                  token_reducer=fastv, policy_hidden=16 if policy else None, cross_rope=cross_rope).eval()
    with torch.no_grad():  # make every part matter: live cross gates, a non-uniform router, large weights so
        # that the image, the context and the budget all change the tokens (at the default init they barely do)
        for cross in m.decoder.cross.values():
            nn.init.constant_(cross.gate, 0.5)
        for module in m.decoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.25)
        for module in m.projector.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.3)
        nn.init.normal_(m.decoder.embed_tokens.weight, std=1.0)
        nn.init.normal_(m.pos_conv.conv.weight, std=0.1)
        if policy:
            nn.init.normal_(m.policy.fc2.weight, std=1.0)
    return m


def _prompts(vocab, seed=1, prompt_lens=PROMPT_LENS):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, max(prompt_lens), dtype=torch.long)  # pad id 0
    for b, n in enumerate(prompt_lens):
        ids[b, :n] = torch.randint(1, vocab, (n,), generator=g)
    images = torch.rand(B, 3, 64, 64, generator=g)
    return images, ids, torch.tensor(prompt_lens)


@torch.no_grad()
def _uncached_greedy(m, images, ids, lens, budgets, max_new=MAX_NEW, image_at=0):
    """No cache: the full forward over the growing right-padded sequences, argmax at each sample's last
    position (fastv ranks by the last prompt token, as in validation)."""
    seqs = [ids[b, : lens[b]].tolist() for b in range(B)]
    for _ in range(max_new):
        n = torch.tensor([len(s) for s in seqs])
        batch = torch.zeros(B, int(n.max()), dtype=torch.long)
        for b, s in enumerate(seqs):
            batch[b, : len(s)] = torch.tensor(s)
        logits = m(images, batch, budget=budgets, query_index=lens - 1, image_at=image_at)  # (B, T, vocab)
        for b, s in enumerate(seqs):
            s.append(int(logits[b, n[b] - 1].argmax()))
    return [s[int(lens[b]):] for b, s in enumerate(seqs)]


PLANS = {
    "all_self": dict(all_self=True),
    "SCTC": dict(self_layers=[0], cross_layers=[1, 3]),
    "optional_cross": dict(self_layers=[0, 2], optional_self=[2], cross_layers=[1, 3], skip_kind="cross"),
    "optional_text": dict(self_layers=[0, 2], optional_self=[2], cross_layers=[1, 3], skip_kind="text"),
    "two_optional": dict(self_layers=[0, 1, 2], optional_self=[1, 2], cross_layers=[3], skip_kind="text",
                         budgets=[[], [1], [2], [1, 2]]),
}


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("fastv", [False, True])
@pytest.mark.parametrize("image_at", [0, 2])  # 2: a chat layout, 2 prompt tokens before the image
def test_cached_greedy_equals_uncached(tiny_decoder_config, name, fastv, image_at):
    c = tiny_decoder_config
    plan = LayerPlan(c.n_layers, **PLANS[name])
    if fastv and name == "two_optional":
        pytest.skip("layer 1 is optional with skip kind text: fastv needs it to read the image")
    m = _model(c, plan, FastVReducer(layer=2, drop_ratio=0.5) if fastv else None)
    images, ids, lens = _prompts(c.vocab_size, prompt_lens=[5, 3, 7, 1 + image_at])
    # mixed per-sample budgets in one batch (every budget present when there are several)
    budgets = torch.arange(B) % plan.n_budgets
    out = generate(m, images, ids, lens, MAX_NEW, budget=budgets, image_at=image_at)
    assert out.tokens.shape == (B, MAX_NEW) and out.lengths.tolist() == [MAX_NEW] * B
    assert out.tokens.tolist() == _uncached_greedy(m, images, ids, lens, budgets, image_at=image_at)
    assert out.budgets.tolist() == budgets.tolist()
    assert out.cache.visual_bytes() == visual_kv_bytes(m, budgets)


@pytest.mark.parametrize("fastv", [False, True])
def test_cached_greedy_equals_uncached_with_cross_rope(tiny_decoder_config, fastv):
    """cross_rope: the cached visual keys are rotated once at prefill, each new query at its own
    position; mixed budgets with skip kind cross, and fastv ranking through a cross sublayer."""
    c = tiny_decoder_config
    plan = LayerPlan(c.n_layers, **PLANS["optional_cross"])
    m = _model(c, plan, FastVReducer(layer=2, drop_ratio=0.5) if fastv else None, cross_rope=True)
    images, ids, lens = _prompts(c.vocab_size)
    budgets = torch.arange(B) % plan.n_budgets
    out = generate(m, images, ids, lens, MAX_NEW, budget=budgets)
    assert out.tokens.tolist() == _uncached_greedy(m, images, ids, lens, budgets)
    plain = _model(c, plan, FastVReducer(layer=2, drop_ratio=0.5) if fastv else None)  # same weights, no RoPE
    assert not torch.equal(m(images, ids, budget=budgets), plain(images, ids, budget=budgets))


def test_padded_batch_equals_each_sample_alone_and_tokens_vary(tiny_decoder_config):
    c = tiny_decoder_config
    m = _model(c, LayerPlan(c.n_layers, **PLANS["optional_cross"]))
    images, ids, lens = _prompts(c.vocab_size)
    budgets = torch.tensor([1, 0, 0, 1])
    batch = generate(m, images, ids, lens, MAX_NEW, budget=budgets).tokens
    for b in range(B):
        alone = generate(m, images[b:b + 1], ids[b:b + 1, : lens[b]], None, MAX_NEW, budget=int(budgets[b])).tokens
        assert batch[b].tolist() == alone[0].tolist()
    # the test model is not degenerate: the image and the budget change the tokens
    assert not torch.equal(batch, generate(m, images.flip(0), ids, lens, MAX_NEW, budget=budgets).tokens)
    assert not torch.equal(batch, generate(m, images, ids, lens, MAX_NEW, budget=1 - budgets).tokens)


def test_router_budgets_match_routed_and_stay_fixed(tiny_decoder_config):
    c = tiny_decoder_config
    plan = LayerPlan(c.n_layers, **PLANS["two_optional"])
    m = _model(c, plan, policy=True, seed=3)
    images, ids, lens = _prompts(c.vocab_size, seed=4)
    mask = torch.arange(ids.shape[1])[None, :] < lens[:, None]
    out = generate(m, images, ids, lens, MAX_NEW, budget="policy")
    with torch.no_grad():
        _, router_logits, budgets = m.routed(images, ids, mask, lambda l: l.argmax(-1), query_index=lens - 1)
    assert torch.allclose(out.router_logits, router_logits, atol=1e-5)
    assert out.budgets.tolist() == budgets.tolist()
    assert out.tokens.tolist() == _uncached_greedy(m, images, ids, lens, budgets)
    # a callable chooser (e.g. select_budgets in a mode) is used as given
    fixed = generate(m, images, ids, lens, 2, budget=lambda l: torch.full((l.shape[0],), 2, dtype=torch.long))
    assert fixed.budgets.tolist() == [2] * B


def test_one_budget_for_the_batch_runs_each_layer_as_one_group(tiny_decoder_config):
    """An int budget stays one budget for the batch: even where every rank must run the same row
    groups (sharded training), each optional layer runs once over the whole batch, not as a pair
    of groups with one empty; (B,) budgets give the pair."""
    c = tiny_decoder_config
    m = _model(c, LayerPlan(c.n_layers, **PLANS["two_optional"]))
    m.decoder.same_calls_on_every_rank = True
    images, ids, lens = _prompts(c.vocab_size)
    one = generate(m, images, ids, lens, 2, budget=1)
    per_sample = generate(m, images, ids, lens, 2, budget=torch.full((B,), 1, dtype=torch.long))
    assert [len(groups) for groups in one.cache.layers] == [1] * c.n_layers
    assert [len(groups) for groups in per_sample.cache.layers] == [1, 2, 2, 1]
    assert one.tokens.tolist() == per_sample.tokens.tolist()
    assert one.budgets.tolist() == [1] * B


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_decoder_config):
    c = tiny_decoder_config
    m = _model(c, LayerPlan(c.n_layers, **PLANS["SCTC"]))
    images, ids, lens = _prompts(c.vocab_size)

    def sample(seed, **kw):
        return generate(m, images, ids, lens, MAX_NEW, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                        **kw).tokens

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    greedy = generate(m, images, ids, lens, MAX_NEW).tokens
    assert torch.equal(m.generate(images, ids, lens, MAX_NEW).tokens, greedy)  # the VisorLVLM method
    assert torch.equal(sample(5, top_k=1), greedy)
    assert set(sample(2, top_k=3).flatten().tolist()) <= set(range(c.vocab_size))


def test_eos_stops_each_sample(tiny_decoder_config):
    c = tiny_decoder_config
    m = _model(c, LayerPlan(c.n_layers, **PLANS["SCTC"]))
    images, ids, lens = _prompts(c.vocab_size)
    free = generate(m, images, ids, lens, MAX_NEW).tokens
    eos = int(free[0, 2])  # sample 0 produces it at step 2
    out = generate(m, images, ids, lens, MAX_NEW, eos_id=eos, pad_id=0)
    for b in range(B):
        row = free[b].tolist()
        n = row.index(eos) + 1 if eos in row else MAX_NEW
        assert out.lengths[b] == n
        assert out.tokens[b, :n].tolist() == row[:n]
        assert (out.tokens[b, n:] == 0).all()
    assert out.lengths[0] <= 3
    if (out.lengths < MAX_NEW).all():
        assert out.tokens.shape[1] == int(out.lengths.max())  # stopped early once all were done


@pytest.mark.parametrize("name, fastv", [("optional_cross", False), ("two_optional", False), ("SCTC", True)])
def test_finished_samples_leave_the_batch_and_the_rest_decode_as_before(tiny_decoder_config, monkeypatch, name, fastv):
    """Mixed budgets (row groups), FastV: once a sample stops (eos or a stop sequence) later decode steps
    run only the others, whose tokens are those of the run without stopping."""
    import src.models.generation as generation
    c = tiny_decoder_config
    m = _model(c, LayerPlan(c.n_layers, **PLANS[name]), FastVReducer(layer=2, drop_ratio=0.5) if fastv else None)
    images, ids, lens = _prompts(c.vocab_size)
    budgets = torch.arange(B) % m.plan.n_budgets
    free = generate(m, images, ids, lens, MAX_NEW, budget=budgets).tokens
    sizes = []
    step = generation.decode_step
    monkeypatch.setattr(generation, "decode_step", lambda lvlm, cache, tok: sizes.append(tok.shape[0]) or step(lvlm, cache, tok))
    eos, stop = int(free[0, 1]), free[2, 1:3].tolist()  # sample 0 stops at step 1 (eos), sample 2 at step 2
    out = generate(m, images, ids, lens, MAX_NEW, budget=budgets, eos_id=eos, pad_id=0, stop_sequences=[stop])
    for b in range(B):
        row = free[b].tolist()
        n = next((i + 1 for i in range(MAX_NEW) if row[i] == eos or row[max(0, i - 1):i + 1] == stop), MAX_NEW)
        assert out.lengths[b] == n and out.tokens[b, :n].tolist() == row[:n] and (out.tokens[b, n:] == 0).all()
    assert out.lengths[0] <= 2 and out.lengths[2] <= 3
    running = [int((out.lengths > i + 1).sum()) for i in range(len(sizes))]
    assert sizes == running and sizes[-1] < B  # each decode step ran only the unfinished samples


@pytest.mark.parametrize("skip_kind", ["text", "cross"])
def test_visual_kv_cache_shrinks_by_L_over_reading_layers(tiny_decoder_config, skip_kind):
    from dataclasses import replace
    c = replace(tiny_decoder_config, n_layers=6)
    plan = LayerPlan(6, self_layers=[0, 2, 4], optional_self=[2, 4], cross_layers=[1, 3, 5], skip_kind=skip_kind)
    m = _model(c, plan)
    images, ids, lens = _prompts(c.vocab_size)
    V = m.num_visual_tokens
    for k in range(plan.n_budgets):
        kinds = plan.budget_kinds(k)
        reading = kinds.count("cross") + kinds.count("self")
        assert visual_kv_ratio(m, k) == pytest.approx(6 / reading)
        cache = generate(m, images, ids, lens, 2, budget=k).cache
        assert cache.visual_bytes() == visual_kv_bytes(m, k, B) == B * reading * V * 2 * c.n_kv_heads * c.head_dim * 4
    assert visual_kv_ratio(m, plan.smallest_budget) == pytest.approx(1.5 if skip_kind == "text" else 1.0)
    # all-self: the cache holds V visual tokens at every layer
    assert visual_kv_bytes(m, all_self=True) == 6 * V * 2 * c.n_kv_heads * c.head_dim * 4


def test_bad_arguments_are_named(tiny_decoder_config):
    c = tiny_decoder_config
    m = _model(c, LayerPlan(c.n_layers, **PLANS["SCTC"]))
    images, ids, lens = _prompts(c.vocab_size)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, images, ids, lens, 0)
    with pytest.raises(ValueError, match="prompt_lens"):
        generate(m, images, ids, torch.tensor([0, 1, 1, 1]), 2)
    with pytest.raises(ValueError, match="policy_hidden"):
        generate(m, images, ids, lens, 2, budget="policy")
    with pytest.raises(IndexError, match="budget 3 out of range"):
        generate(m, images, ids, lens, 2, budget=3)


def test_decode_attention_equals_masked_sdpa_with_grouped_heads():
    """src/ops/attention.decode_attention (one key read per KV head group) against SDPA with the KV
    heads repeated and the unseen slots masked, at per-sample lengths."""
    import torch.nn.functional as F

    from src.ops.attention import decode_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 6, 1, 8, generator=g), torch.randn(3, 2, 10, 8, generator=g), torch.randn(3, 2, 10, 8, generator=g)
    lengths = torch.tensor([10, 4, 1])
    visible = torch.arange(10)[None, :] < lengths[:, None]
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                          attn_mask=visible[:, None, None, :])
    torch.testing.assert_close(decode_attention(q, k, v, lengths), want, atol=1e-6, rtol=1e-5)


def test_repeated_cache_decodes_as_the_repeated_batch(tiny_decoder_config):
    """KVCache.repeat (the decode benchmark's large batches) with mixed budgets: the same next-token
    logits as a prefill over the batch of copies."""
    from src.models.generation import decode_step, prefill
    c = tiny_decoder_config
    m = _model(c, LayerPlan(c.n_layers, **PLANS["optional_cross"]))
    images, ids, lens = _prompts(c.vocab_size)
    budgets = torch.tensor([0, 1, 1, 0])
    _, cache, _, _ = prefill(m, images, ids, lens, 10, budgets)
    _, big, _, _ = prefill(m, images.repeat_interleave(2, 0), ids.repeat_interleave(2, 0), lens.repeat_interleave(2),
                           10, budgets.repeat_interleave(2))
    tok = torch.arange(1, 2 * B + 1)
    torch.testing.assert_close(decode_step(m, cache.repeat(2), tok), decode_step(m, big, tok), atol=1e-5, rtol=1e-5)
    assert cache.repeat(2).visual_bytes() == 2 * cache.visual_bytes()


@pytest.mark.parametrize("mode", ["autocast", "bf16_model"])
def test_generation_in_bfloat16(tiny_decoder_config, mode):
    """bf16-mixed (autocast) keeps a bf16 cache the decode steps write into; a bf16 model likewise.
    Mixed budgets, so the per-group caches and the gather/scatter of rows run in bf16 too."""
    c = tiny_decoder_config
    plan = LayerPlan(c.n_layers, **PLANS["optional_cross"])
    m = _model(c, plan)
    images, ids, lens = _prompts(c.vocab_size)
    budgets = torch.arange(B) % plan.n_budgets
    if mode == "bf16_model":
        m = m.to(torch.bfloat16)
        out = generate(m, images.to(torch.bfloat16), ids, lens, MAX_NEW, budget=budgets)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = generate(m, images, ids, lens, MAX_NEW, budget=budgets)
    assert out.tokens.shape == (B, MAX_NEW) and out.lengths.tolist() == [MAX_NEW] * B
    groups = [g for layer in out.cache.layers for g in layer]
    assert groups and all(g.k.dtype == torch.bfloat16 and g.v.dtype == torch.bfloat16 for g in groups)
    assert all(g.cross_k.dtype == torch.bfloat16 for g in groups if g.kind == "cross")
    assert ((out.tokens >= 0) & (out.tokens < c.vocab_size)).all()
