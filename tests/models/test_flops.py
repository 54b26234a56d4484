import pytest
import torch

from src.flops import cross_sublayer_flops, layer_flops, measured_flops, sample_flops
from src.models.decoder import Decoder
from src.models.rope import rope_cos_sin
from src.models.lvlm import VisorLVLM
from src.models.plan import LayerPlan
from src.models.vision import VisionEncoder


def _close(a, b, tol=0.05):
    return abs(a - b) <= tol * b


@pytest.mark.parametrize("kind", ["self", "cross", "text"])
def test_layer_flops_match_flop_counter(tiny_decoder_config, kind):
    c = tiny_decoder_config
    dec = Decoder(c, LayerPlan(c.n_layers, self_layers=[0], cross_layers=[1]))
    V, T = 24, 9
    visual, text = torch.randn(1, V, c.d_model), torch.randn(1, T, c.d_model)
    cos, sin = rope_cos_sin(torch.arange(V + T), c.head_dim, c.rope_theta, torch.float32)
    layer = dec.layers[1]
    if kind == "self":
        got = measured_flops(layer, torch.cat([visual, text], 1), cos, sin)
    elif kind == "text":
        got = measured_flops(layer, text, cos[V:], sin[V:])
    else:
        got = measured_flops(lambda: layer(dec.cross["1"](text, visual), cos[V:], sin[V:]))
        assert _close(measured_flops(dec.cross["1"], text, visual), cross_sublayer_flops(c, V, T))
    assert _close(got, layer_flops(c, kind, V, T)), (got, layer_flops(c, kind, V, T))


@pytest.mark.parametrize("image_at", [0, 2])  # 2: a chat layout, whose 2 text tokens before the image skip cross
def test_sample_flops_match_whole_model(tiny_decoder_config, image_at):
    enc = VisionEncoder("test_byobnet", feature_layer=2, image_size=64)
    model = VisorLVLM(enc, tiny_decoder_config, LayerPlan(4, self_layers=[0], cross_layers=[1, 3])).eval()
    T = 6
    images, ids = torch.rand(1, 3, 64, 64), torch.randint(0, 40, (1, T))
    with torch.no_grad():
        got = measured_flops(lambda: model(images, ids, image_at=image_at))
    expected = sample_flops(model, T, image_at=image_at)
    assert _close(got, expected.total), (got, expected)
    if image_at:  # exactly the cross-attention work of the image_at rows, measured against counted
        with torch.no_grad():
            saved = measured_flops(lambda: model(images, ids)) - got
        assert saved == sample_flops(model, T).llm - expected.llm > 0, (saved, sample_flops(model, T).llm - expected.llm)
    assert expected.llm < sample_flops(VisorLVLM(enc, tiny_decoder_config, LayerPlan(4, all_self=True)), T).llm


def test_measured_flops_count_cpu_attention_and_halve_causal_masks():
    """src/ops/sdpa_flops.py: on CPU, scaled_dot_product_attention's kernel is counted (torch 2.14 counted
    0), a causal square at half the full one (the convention of src/flops.py), forward and backward."""
    import torch.nn.functional as F

    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k, v = torch.randn(2, 4, 24, 8), torch.randn(2, 4, 24, 8)
    full = 4 * 2 * 4 * 16 * 24 * 8
    assert measured_flops(F.scaled_dot_product_attention, q, k, v) == full
    out = F.scaled_dot_product_attention(q, k, v)
    assert measured_flops(lambda: out.sum().backward()) >= 2 * full  # dS, dP, dQ, dK, dV: at least 2x forward
    kc, vc = k[:, :, :16], v[:, :, :16]
    square = 4 * 2 * 4 * 16 * 16 * 8
    assert measured_flops(lambda: F.scaled_dot_product_attention(q, kc, vc, is_causal=True)) == square // 2
    q.grad = None
    out = F.scaled_dot_product_attention(q, kc, vc, is_causal=True)
    causal_bwd = measured_flops(lambda: out.sum().backward())
    q.grad = None
    out = F.scaled_dot_product_attention(q, kc, vc)
    assert 2 * causal_bwd == measured_flops(lambda: out.sum().backward())
