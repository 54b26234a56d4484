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


def test_sample_flops_match_whole_model(tiny_decoder_config):
    enc = VisionEncoder("test_byobnet", feature_layer=2, image_size=64)
    model = VisorLVLM(enc, tiny_decoder_config, LayerPlan(4, self_layers=[0], cross_layers=[1, 3])).eval()
    T = 6
    images, ids = torch.rand(1, 3, 64, 64), torch.randint(0, 40, (1, T))
    with torch.no_grad():
        got = measured_flops(model, images, ids)
    expected = sample_flops(model, T)
    assert _close(got, expected.total), (got, expected)
    assert expected.llm < sample_flops(VisorLVLM(enc, tiny_decoder_config, LayerPlan(4, all_self=True)), T).llm


def test_flop_counter_counts_cpu_attention_forward_and_backward():
    """src/ops/sdpa_flops.py: on CPU, scaled_dot_product_attention's kernel is counted (torch 2.14 counted 0)."""
    import torch.nn.functional as F
    import torch.utils.flop_counter

    import src.ops  # noqa: F401
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k, v = torch.randn(2, 4, 24, 8), torch.randn(2, 4, 24, 8)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * 2 * 4 * 16 * 24 * 8
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() >= 2 * 4 * 2 * 4 * 16 * 24 * 8  # dS, dP, dQ, dK, dV: at least 2x forward
