"""Budgets in the layer plan: their kinds, bad budgets named, per-sample execution and its FLOPs."""
import pytest
import torch

from src.flops import layer_flops, llm_flops
from src.models.decoder import Decoder
from src.models.plan import LayerPlan, PlanError


def _plan(**kw):
    args = dict(self_layers=[0, 2, 4], optional_self=[2, 4], cross_layers=[1, 3, 5])
    args.update(kw)
    return LayerPlan(6, **args)


def test_default_budgets_are_nested_prefixes_and_kinds_follow():
    p = _plan()
    assert p.budgets == [[], [2], [2, 4]]
    assert (p.smallest_budget, p.largest_budget, p.first_optional) == (0, 2, 2)
    assert [p.budget_name(k) for k in range(3)] == ["SCCCCC", "SCSCCC", "SCSCSC"]
    assert _plan(skip_kind="text").budget_name(0) == "SCTCTC"
    assert p.cross_sublayers == [1, 2, 3, 4, 5] and _plan(skip_kind="text").cross_sublayers == [1, 3, 5]


@pytest.mark.parametrize("kw, field", [
    (dict(optional_self=[1]), "plan.optional_self"),
    (dict(budgets=[[2], [3]]), r"plan.budgets\[1\]"),
    (dict(budgets=[[2], [2]]), r"plan.budgets\[1\]"),
    (dict(budgets=[[2, 2]]), r"plan.budgets\[0\]"),
    (dict(budgets=[]), "plan.budgets is empty"),
    (dict(skip_kind="self"), "plan.skip_kind"),
    (dict(optional_self=[], budgets=[[]]), "plan.budgets given"),
])
def test_bad_budgets_name_the_field(kw, field):
    with pytest.raises(PlanError, match=field):
        _plan(**kw)


def test_mixed_budget_batch_equals_each_sample_alone(tiny_decoder_config):
    c = tiny_decoder_config
    for skip_kind in ("cross", "text"):
        torch.manual_seed(0)
        dec = Decoder(c, LayerPlan(c.n_layers, self_layers=[0, 2], optional_self=[2], cross_layers=[1, 3],
                                   skip_kind=skip_kind)).eval()
        for cross in dec.cross.values():
            torch.nn.init.constant_(cross.gate, 0.5)  # live cross sublayers
        visual, text = torch.randn(6, 12, c.d_model), torch.randn(6, 5, c.d_model)
        budgets = torch.tensor([0, 1, 1, 0, 1, 0])
        with torch.no_grad():
            hidden, vis = dec(visual, text, budget=budgets)
            for b in range(6):
                h1, v1 = dec(visual[b:b + 1], text[b:b + 1], budget=int(budgets[b]))
                assert (hidden[b] - h1[0]).abs().max() < 1e-5 and (vis[b] - v1[0]).abs().max() < 1e-5
            # the budgets really differ: the self path changes the visual tokens, the skip path does not
            assert (dec(visual, text, budget=0)[1] - dec(visual, text, budget=1)[1]).abs().max() > 1e-3


def test_batch_flops_are_the_sum_of_per_sample_flops(tiny_decoder_config):
    c = tiny_decoder_config
    plan = LayerPlan(c.n_layers, self_layers=[0, 2], optional_self=[2], cross_layers=[1, 3])
    V, T = 12, 5
    per_budget = [llm_flops(c, plan.budget_kinds(k), V, T) for k in range(plan.n_budgets)]
    assert per_budget[1] - per_budget[0] == layer_flops(c, "self", V, T) - layer_flops(c, "cross", V, T)
    budgets = [0, 1, 1, 0, 1, 0]
    # the gathered execution runs the self layer on 3 samples and the cross path on 3
    from src.flops import measured_flops
    torch.manual_seed(0)
    dec = Decoder(c, plan).eval()
    visual, text = torch.randn(6, V, c.d_model), torch.randn(6, T, c.d_model)
    with torch.no_grad():
        got = measured_flops(lambda: dec(visual, text, budget=torch.tensor(budgets)))
    lm_head = 2 * T * c.d_model * c.vocab_size  # llm_flops counts the head, the decoder call does not
    want = sum(per_budget[k] - lm_head for k in budgets)
    assert abs(got - want) / want < 0.05, (got, want)
