"""The pooling probe's pieces (experiments/probes/pooling_probe.py): crops, inputs, and the measured fact
that 2x2 pooling of target-like tokens loses the digits' order often, while the full tokens keep it."""
import torch
import torch.nn.functional as F

from experiments.probes.pooling_probe import corner_crop, order_lost, probe_input, scenes, train_probe
from src.data.dense_targets import dense_targets


def test_corner_crop_and_probe_input_shapes():
    tokens = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 16, 16)
    crop = corner_crop(tokens, "bottom-right")
    assert crop.shape == (2, 4, 4) and crop[0, -1, -1] == tokens[0, 15, 15] and crop[0, 0, 0] == tokens[0, 12, 12]
    assert corner_crop(tokens, "top-left")[1, 0, 0] == tokens[1, 0, 0]
    assert probe_input(crop, "top-right", pool=False).shape == (2 * 16 + 4,)
    pooled = probe_input(crop, "top-right", pool=True)
    assert pooled.shape == (2 * 4 + 4,) and pooled[0] == crop[0, :2, :2].mean() and pooled[-3] == 1.0


def test_two_by_two_pooling_of_target_like_tokens_loses_the_digit_order_often():
    items = [s for _, s in scenes(seed=5, n=200)]
    lost = sum(order_lost(s, (16, 16), 128) for s in items) / len(items)
    assert 0.3 < lost < 0.6, lost  # measured 42-45% (the digits share a pooled cell and a half)
    for s in items:  # unpooled, the swapped digits always give different targets
        text = s["text_box"]["text"]
        if text != text[::-1]:
            swapped = dict(s, text_box=dict(s["text_box"], text=text[::-1]))
            assert not torch.equal(dense_targets(s, (16, 16), 128), dense_targets(swapped, (16, 16), 128))


def test_probe_learns_a_readable_code_and_not_an_unreadable_one():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (600, 2))
    readable = torch.cat([F.one_hot(y[:, 0], 10), F.one_hot(y[:, 1], 10)], 1).float()
    order_free = F.one_hot(y[:, 0], 10).float() + F.one_hot(y[:, 1], 10).float()
    acc_readable = train_probe(readable[:500], y[:500], readable[500:], y[500:], 2, epochs=20)
    acc_order_free = train_probe(order_free[:500], y[:500], order_free[500:], y[500:], 2, epochs=20)
    assert acc_readable > 0.95 and acc_order_free < 0.7, (acc_readable, acc_order_free)


def test_fitted_target_head_recovers_a_linear_rule():
    from experiments.probes.pooling_probe import fit_target_head
    torch.manual_seed(0)
    feats = [torch.randn(6, 4, 4) for _ in range(40)]
    targets = [torch.stack([(f[0] > 0).float(), (f[1] + f[2] < 0).float()]) for f in feats]
    head = fit_target_head(feats, targets, steps=200, pos_weight=1.0)
    f = torch.randn(6, 4, 4)
    logits = torch.einsum("kc,chw->khw", head.weight, f) + head.bias.view(-1, 1, 1)
    assert torch.equal(logits[0] > 0, f[0] > 0) and torch.equal(logits[1] > 0, f[1] + f[2] < 0)


def test_crop_holds_the_box_for_longer_strings():
    from experiments.probes.pooling_probe import crop_size
    assert crop_size([s for _, s in scenes(seed=5, n=50)], 8, 128) == 4
    six = [s for _, s in scenes(seed=5, n=50, text_len=6)]
    crop = crop_size(six, 8, 128)
    assert crop % 2 == 0 and all(max(s["text_box"]["box"][2] - s["text_box"]["box"][0] + 2,
                                     s["text_box"]["box"][3] - s["text_box"]["box"][1] + 2) <= 8 * crop for s in six)
    assert crop > 4
