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
