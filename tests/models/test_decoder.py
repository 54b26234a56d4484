import pytest
import torch

from src.models.cross_attention import CrossAttention
from src.models.decoder import Decoder, DecoderConfig
from src.models.plan import LayerPlan


def _pair(config, plan, seed=0):
    torch.manual_seed(seed)
    return Decoder(config, plan).eval()


def test_all_self_equals_plain_decoder_over_concatenation(tiny_decoder_config):
    c = tiny_decoder_config
    dec = _pair(c, LayerPlan(c.n_layers, all_self=True))
    torch.manual_seed(1)
    visual, ids = torch.randn(3, 20, c.d_model), torch.randint(0, c.vocab_size, (3, 7))
    text = dec.embed_tokens(ids)
    with torch.no_grad():
        hidden, _ = dec(visual, text)
        logits = dec.lm_head(hidden)
        plain = dec.lm_head(dec.forward_plain(torch.cat([visual, text], 1)))[:, 20:]
    assert (logits - plain).abs().max().item() < 1e-5


def test_chat_layout_all_self_equals_plain_decoder_over_the_sequence_in_order(tiny_decoder_config):
    """image_at text tokens, the image, the rest of the text: an all-self plan is the plain LLM over
    that sequence (positions in order, causal: the text before the image does not see it)."""
    c = tiny_decoder_config
    dec = _pair(c, LayerPlan(c.n_layers, all_self=True))
    torch.manual_seed(1)
    visual, ids, A = torch.randn(3, 20, c.d_model), torch.randint(0, c.vocab_size, (3, 7)), 3
    text = dec.embed_tokens(ids)
    with torch.no_grad():
        hidden, visual_out = dec(visual, text, image_at=A)
        plain = dec.forward_plain(torch.cat([text[:, :A], visual, text[:, A:]], 1))
    torch.testing.assert_close(hidden, torch.cat([plain[:, :A], plain[:, A + 20:]], 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(dec.norm(visual_out), plain[:, A:A + 20], atol=1e-5, rtol=0)


@pytest.mark.parametrize("plan", [dict(all_self=True), dict(self_layers=[0], cross_layers=[1, 3]),
                                  dict(cross_layers=[0, 1, 2, 3])])
def test_chat_layout_text_before_the_image_never_reads_it(tiny_decoder_config, plan):
    """In every layer kind the rows before the image are the same whatever the image (self: causal in
    the sequence's order; cross: they are not queries); the rows after it do read it."""
    c = tiny_decoder_config
    dec = _pair(c, LayerPlan(c.n_layers, **plan))
    for cross in dec.cross.values():
        torch.nn.init.constant_(cross.gate, 0.7)
    torch.manual_seed(2)
    text, A = torch.randn(2, 9, c.d_model), 4
    with torch.no_grad():
        one, _ = dec(torch.randn(2, 12, c.d_model), text, image_at=A)
        other, _ = dec(torch.randn(2, 12, c.d_model), text, image_at=A)
    assert torch.equal(one[:, :A], other[:, :A])
    assert (one[:, A:] - other[:, A:]).abs().min() > 0


def test_text_and_cross_layers_leave_visual_bit_identical(tiny_decoder_config):
    c = tiny_decoder_config
    dec = _pair(c, LayerPlan(c.n_layers, cross_layers=[0, 2]))  # C T C T: no self layer at all
    for cross in dec.cross.values():
        torch.nn.init.constant_(cross.gate, 0.7)  # a live gate: text does read the image
    visual, text = torch.randn(2, 16, c.d_model), torch.randn(2, 5, c.d_model)
    before = visual.clone()
    with torch.no_grad():
        _, visual_out = dec(visual, text)
    assert torch.equal(visual_out, before)


def test_cross_with_gate_zero_leaves_text_unchanged(tiny_decoder_config):
    c = tiny_decoder_config
    cross = CrossAttention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, True, 1e-6)
    text, visual = torch.randn(2, 5, c.d_model), torch.randn(2, 16, c.d_model)
    assert torch.equal(cross(text, visual), text)
    # Whole decoder: a cross plan at gate 0 equals the same weights with those layers `text`.
    a = _pair(c, LayerPlan(c.n_layers, self_layers=[0], cross_layers=[1, 3]))
    b = _pair(c, LayerPlan(c.n_layers, self_layers=[0]))
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("cross.")})
    with torch.no_grad():
        ha, _ = a(visual, text)
        hb, _ = b(visual, text)
    assert torch.equal(ha, hb)
    # ... and a live gate changes the text.
    torch.nn.init.constant_(a.cross["1"].gate, 0.5)
    with torch.no_grad():
        hc, _ = a(visual, text)
    assert not torch.allclose(hc, hb)


def test_cross_init_copies_host_attention(tiny_decoder_config):
    c = tiny_decoder_config
    dec = _pair(c, LayerPlan(c.n_layers, self_layers=[0], cross_layers=[2]))
    assert torch.equal(dec.cross["2"].q_proj.weight, dec.layers[2].attn.q_proj.weight)
    assert torch.equal(dec.cross["2"].k_proj.bias, dec.layers[2].attn.k_proj.bias)
    rnd = Decoder(c, LayerPlan(c.n_layers, self_layers=[0], cross_layers=[2]), cross_init="random")
    assert not torch.equal(rnd.cross["2"].q_proj.weight, rnd.layers[2].attn.q_proj.weight)


def _host_text_to_visual_logits(dec, i, visual, text):
    """Host layer i's self-attention logits of the text queries over the visual keys (B, H, T, V),
    in the original LVLM: [visual; text] at positions 0..V+T-1, RoPE on q and k."""
    from src.models.rope import apply_rope
    B, V, _ = visual.shape
    T = text.shape[1]
    attn = dec.layers[i].attn
    x = dec.layers[i].input_norm(torch.cat([visual, text], 1))
    q = attn.q_proj(x).view(B, V + T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, V + T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    cos, sin = dec.rope(dec.positions(V, T, x.device), x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    return (q[:, :, V:] @ k[:, :, :V].transpose(-1, -2))  # (B, H, T, V)


@pytest.mark.parametrize("cross_rope", [False, True])
def test_cross_rope_starts_as_the_hosts_text_to_visual_attention(tiny_decoder_config, cross_rope):
    """With cross_rope a host-initialised cross sublayer attends exactly as its host layer's text
    queries did over the visual keys; without RoPE it does not (the positional code is lost)."""
    c = tiny_decoder_config
    torch.manual_seed(0)
    dec = Decoder(c, LayerPlan(c.n_layers, self_layers=[0], cross_layers=[2]), cross_rope=cross_rope).eval()
    V, T = 12, 5
    visual, text = torch.randn(2, V, c.d_model), torch.randn(2, T, c.d_model)
    cos, sin = dec.rope(dec.positions(V, T, visual.device), visual.dtype)
    cross = dec.cross["2"]
    with torch.no_grad():
        q = cross.queries(text, cos[..., V:, :], sin[..., V:, :])
        k, _ = cross.visual_kv(visual, cos[..., :V, :], sin[..., :V, :])
        mine = q @ k.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1).transpose(-1, -2)
        host = _host_text_to_visual_logits(dec, 2, visual, text)
    assert torch.allclose(mine, host, atol=1e-5) == cross_rope
    if cross_rope:  # the tables are required: a missing one is an error, not a silent no-RoPE run
        with pytest.raises(ValueError, match="cross_rope"):
            cross(text, visual)


@pytest.mark.parametrize("field, kwargs", [
    ("preset", dict(preset="nope")),
    ("n_kv_heads", dict(n_heads=4, n_kv_heads=3)),
    ("n_heads", dict(d_model=30, n_heads=4)),
    ("rope_theta", dict(rope_theta=-1.0)),
])
def test_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        DecoderConfig(**kwargs)


def test_plan_and_config_layers_must_agree(tiny_decoder_config):
    with pytest.raises(ValueError, match="n_layers"):
        Decoder(tiny_decoder_config, LayerPlan(3, all_self=True))


def test_visor_decoder_compiles_without_graph_breaks(tiny_decoder_config):
    """The attention dispatch point's ops (C++ when built) trace into one graph under torch.compile."""
    c = tiny_decoder_config
    dec = _pair(c, LayerPlan(c.n_layers, self_layers=[0], cross_layers=[1, 3]))
    for cross in dec.cross.values():
        torch.nn.init.constant_(cross.gate, 0.5)
    visual, text = torch.randn(2, 16, c.d_model), torch.randn(2, 5, c.d_model)
    explained = torch._dynamo.explain(dec)(visual, text)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(dec, backend="aot_eager", fullgraph=True)
    out, _ = compiled(visual, text)
    ref, _ = dec(visual, text)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert dec.cross["1"].gate.grad is not None and dec.cross["1"].gate.grad.abs() > 0


def test_logits_at_the_answer_positions_equal_the_full_head_and_metrics_agree(tiny_decoder_config):
    """VisorLVLM's LM head only where logits are read (src/lit/batch.answer_logits): the same rows as
    the head over every position, and exact_match / answer_nll give the same per-sample values."""
    import torch.nn.functional as F

    from src.metrics import answer_nll, exact_match
    from src.models import VisionEncoder, VisorLVLM
    c = tiny_decoder_config
    torch.manual_seed(0)
    m = VisorLVLM(VisionEncoder("test_byobnet", 2, 64), c, LayerPlan(c.n_layers, self_layers=[0], cross_layers=[1, 3])).eval()
    images, ids = torch.rand(3, 3, 64, 64), torch.randint(1, c.vocab_size, (3, 7))
    labels = torch.full((3, 7), -100)
    labels[0, 4:] = ids[0, 4:]
    labels[1, 6] = 5
    with torch.no_grad():
        every = m(images, ids)  # (B, T, vocab)
        picked = m(images, ids, logits_at=labels != -100)  # (N, vocab)
    assert picked.shape == (4, c.vocab_size)
    torch.testing.assert_close(picked, every[labels != -100], atol=1e-6, rtol=0)
    labels[0, 4:] = every[0, 4:].argmax(-1)  # sample 0 right, sample 1 (most likely) wrong, sample 2 no answer
    assert exact_match(every, labels).tolist() == exact_match(every[labels != -100], labels).tolist()
    assert exact_match(every[labels != -100], labels)[0] and not exact_match(every[labels != -100], labels)[2]
    nll = F.cross_entropy(every.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
    want = nll / (labels != -100).sum(1).clamp_min(1)
    torch.testing.assert_close(answer_nll(every[labels != -100], labels), want)
    with pytest.raises(AssertionError, match="logits_at"):
        m(images, ids, logits_at=labels)
