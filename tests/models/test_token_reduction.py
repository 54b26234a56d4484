"""Token-reduction baselines: exact counts, original RoPE positions, FLOPs, masked-attention references."""
import math

import pytest
import torch
import torch.nn.functional as F

from src.flops import measured_flops, sample_flops
from src.models import (AvgPoolReducer, FastVReducer, LayerPlan, RandomReducer, VisionEncoder, VisionZipReducer,
                        VisorLVLM)
from src.models.rope import apply_rope, rope_cos_sin


def _close(a, b, tol=0.05):
    return abs(a - b) <= tol * max(a, b)


def test_avg_pool_reducer():
    r = AvgPoolReducer(2)
    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, one channel
    out, positions = r(x, (4, 4))
    assert r.output_grid((4, 4)) == (2, 2) and r.n_tokens(16) == 4 and positions is None
    assert out.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="token_reducer.size"):
        AvgPoolReducer(3).output_grid((4, 4))


@pytest.mark.parametrize("keep", [0.25, 0.11, 0.5])
def test_selection_reducers_keep_exact_counts_and_original_tokens(keep):
    torch.manual_seed(0)
    x = torch.randn(3, 64, 8)
    n = int(round(64 * keep))
    for reducer in (RandomReducer(keep, seed=1), VisionZipReducer(keep, contextual_fraction=0.0)):
        out, pos = reducer(x, (8, 8))
        assert out.shape == (3, n, 8) and pos.shape == (3, n) and reducer.n_tokens(64) == n
        assert (pos[:, 1:] > pos[:, :-1]).all()  # ascending, distinct: raster order kept
        assert torch.equal(out, x.gather(1, pos.unsqueeze(-1).expand(-1, -1, 8)))  # tokens are the originals
    # VisionZip without contextual tokens keeps the largest-norm tokens.
    out, pos = VisionZipReducer(keep, contextual_fraction=0.0)(x, (8, 8))
    norms = x.norm(dim=-1)
    assert torch.equal(pos, norms.topk(n, dim=1).indices.sort(dim=1).values)
    # The random subset is seeded: the same for every image and every call, different for another seed.
    _, p1 = RandomReducer(keep, seed=1)(x, (8, 8))
    _, p2 = RandomReducer(keep, seed=2)(x, (8, 8))
    assert torch.equal(p1[0], p1[1]) and not torch.equal(p1[0], p2[0])


def test_visionzip_contextual_tokens_are_means_of_their_groups():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8)
    r = VisionZipReducer(0.25, contextual_fraction=0.25)
    n_dom, n_ctx = r.split(64)
    assert (n_dom, n_ctx) == (12, 4)
    out, pos = r(x, (8, 8))
    assert out.shape == (2, 16, 8) and pos.shape == (2, 16) and (pos[:, 1:] > pos[:, :-1]).all()
    for b in range(2):
        dominant = x[b].norm(dim=-1).topk(n_dom).indices
        rest = sorted(set(range(64)) - set(dominant.tolist()))
        ctx_slots = [j for j in range(16) if int(pos[b, j]) not in set(dominant.tolist())]
        assert len(ctx_slots) == n_ctx
        targets = pos[b, ctx_slots]
        sim = F.normalize(x[b, rest], dim=-1) @ F.normalize(x[b, targets], dim=-1).T
        assign = sim.argmax(1)
        for c, slot in enumerate(ctx_slots):
            members = [rest[i] for i in range(len(rest)) if assign[i] == c]
            assert int(targets[c]) in members  # a target is in its own group
            assert torch.allclose(out[b, slot], x[b, members].mean(0), atol=1e-6)


def test_reducer_errors_name_the_field():
    with pytest.raises(ValueError, match="token_reducer.keep_ratio"):
        RandomReducer(0.0)
    with pytest.raises(ValueError, match="token_reducer.keep_ratio"):
        RandomReducer(0.001).n_tokens(64)
    with pytest.raises(ValueError, match="token_reducer.contextual_fraction"):
        VisionZipReducer(0.25, contextual_fraction=1.0)
    with pytest.raises(ValueError, match="token_reducer.drop_ratio"):
        FastVReducer(2, 1.0)
    with pytest.raises(ValueError, match="token_reducer.layer"):
        FastVReducer(0, 0.5)


def _model(cfg, plan, reducer, seed=0):
    torch.manual_seed(seed)
    enc = VisionEncoder("test_byobnet", feature_layer=2, image_size=64)  # 8x8 = 64 tokens
    return VisorLVLM(enc, cfg, plan, pos_conv=False, token_reducer=reducer).eval()


def _masked_reference(model, images, ids, from_layer, choose):
    """The unreduced all-self model over [visual; text] with positions 0..V+T-1, where from layer
    `from_layer` on the visual keys outside `keep` (B, V') are masked out of every attention: what
    dropping those tokens means when the kept tokens keep their original positions.
    choose(q, k) -> keep, called with layer max(from_layer - 1, 0)'s roped q (B, H, S, hd) and k."""
    dec = model.decoder
    c = dec.config
    visual = model.projector(model.vision(images))
    x = torch.cat([visual, dec.embed_tokens(ids)], dim=1)  # (B, S, d)
    B, S, _ = x.shape
    V = visual.shape[1]
    cos, sin = rope_cos_sin(torch.arange(S), c.head_dim, c.rope_theta, x.dtype)
    allowed = torch.ones(B, S, dtype=torch.bool)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    keep = None
    for i, layer in enumerate(dec.layers):
        h = layer.input_norm(x)
        q = apply_rope(layer.attn.q_proj(h).view(B, S, c.n_heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(layer.attn.k_proj(h).view(B, S, c.n_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        v = layer.attn.v_proj(h).view(B, S, c.n_kv_heads, c.head_dim).transpose(1, 2)
        k, v = (t.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1) for t in (k, v))
        if i == max(from_layer - 1, 0):
            keep = choose(q, k)
        if i == from_layer:
            allowed = torch.zeros(B, S, dtype=torch.bool)
            allowed[:, V:] = True
            allowed.scatter_(1, keep, True)
        mask = (causal[None] & allowed[:, None, :]) | torch.eye(S, dtype=torch.bool)  # (B, S, S); the
        # diagonal only keeps dropped rows (whose outputs are never read) finite
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(c.head_dim)
        y = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ v
        x = x + layer.attn.o_proj(y.transpose(1, 2).reshape(B, S, -1))
        x = x + layer.mlp(layer.post_attn_norm(x))
    return dec.lm_head(dec.norm(x[:, V:]))


@pytest.mark.parametrize("reducer", [RandomReducer(0.25, seed=3), VisionZipReducer(0.3, contextual_fraction=0.0)])
def test_selection_reducer_equals_masking_the_dropped_tokens(tiny_decoder_config, reducer):
    model = _model(tiny_decoder_config, LayerPlan(4, all_self=True), reducer)
    images, ids = torch.rand(2, 3, 64, 64), torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        got = model(images, ids)
        _, keep = reducer(model.projector(model.vision(images)), (8, 8))
        want = _masked_reference(model, images, ids, 0, lambda q, k: keep)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("K", [1, 2])
def test_fastv_equals_masking_the_least_attended_tokens(tiny_decoder_config, K):
    reducer = FastVReducer(layer=K, drop_ratio=0.75)
    model = _model(tiny_decoder_config, LayerPlan(4, all_self=True), reducer)
    images, ids = torch.rand(3, 3, 64, 64), torch.randint(0, 40, (3, 7))
    query = torch.tensor([6, 3, 4])
    V = 64

    def choose(q, k):
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))  # (B, H, S, S)
        S = probs.shape[-1]
        probs = probs.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        row = probs[torch.arange(3), :, V + query]  # (B, H, S): the query token's attention
        return row[..., :V].mean(1).topk(16, dim=1).indices.sort(1).values

    with torch.no_grad():
        got = model(images, ids, query_index=query)
        want = _masked_reference(model, images, ids, K, choose)
    assert model.num_visual_tokens == 64 and reducer.n_kept(64) == 16
    assert (got - want).abs().max() < 1e-5


def test_fastv_ranks_at_a_cross_layer_and_rejects_a_text_layer(tiny_decoder_config):
    plan = LayerPlan(4, self_layers=[0], cross_layers=[1, 3])
    model = _model(tiny_decoder_config, plan, FastVReducer(layer=2, drop_ratio=0.5))
    with torch.no_grad():
        for layer in model.decoder.cross.values():
            layer.gate.fill_(0.5)
        out = model(torch.rand(2, 3, 64, 64), torch.randint(0, 40, (2, 5)))
    assert out.shape == (2, 5, 40) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="token_reducer.layer=3"):
        _model(tiny_decoder_config, plan, FastVReducer(layer=3, drop_ratio=0.5))  # layer 2 is text
    with pytest.raises(ValueError, match="token_reducer.layer=4"):
        _model(tiny_decoder_config, plan, FastVReducer(layer=4, drop_ratio=0.5))


@pytest.mark.parametrize("plan_kind", ["full", "visor"])
@pytest.mark.parametrize("reducer", [AvgPoolReducer(2), RandomReducer(0.25), VisionZipReducer(0.25),
                                     FastVReducer(2, 0.5), FastVReducer(1, 0.75)], ids=lambda r: type(r).__name__)
def test_flops_of_every_reducer_match_the_counter(tiny_decoder_config, plan_kind, reducer):
    plan = LayerPlan(4, all_self=True) if plan_kind == "full" else LayerPlan(4, self_layers=[0, 2], cross_layers=[1, 3])
    model = _model(tiny_decoder_config, plan, reducer)
    T = 6
    with torch.no_grad():
        got = measured_flops(model, torch.rand(1, 3, 64, 64), torch.randint(0, 40, (1, T)))
    expected = sample_flops(model, T)
    assert _close(got, expected.total, 0.01), (got, expected)
    unreduced = sample_flops(_model(tiny_decoder_config, plan, None), T)
    assert expected.llm < unreduced.llm
