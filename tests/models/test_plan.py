import pytest

from src.models.plan import LayerPlan, PlanError


def test_explicit_and_rule_plans():
    p = LayerPlan(6, self_layers=[0], cross_layers=[1, 3, 5])
    assert p.kinds == ["self", "cross", "text", "cross", "text", "cross"]
    assert str(p) == "SCTCTC"
    r = LayerPlan(6, self_layers=[0], cross_every=2, cross_offset=1)
    assert r.kinds == p.kinds
    assert LayerPlan(3, all_self=True).kinds == ["self"] * 3
    assert LayerPlan(4, self_layers=[0], cross_every=2).kinds == ["self", "text", "cross", "text"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_layers=4, self_layers=[4]), "self_layers"),
    (dict(n_layers=4, cross_layers=[-1]), "cross_layers"),
    (dict(n_layers=4, self_layers=[1], cross_layers=[1, 2]), "two kinds"),
    (dict(n_layers=4), "empty"),
    (dict(n_layers=0, self_layers=[0]), "n_layers"),
    (dict(n_layers=4, cross_layers=[1, 1]), "twice"),
    (dict(n_layers=4, cross_every=0), "cross_every"),
    (dict(n_layers=4, cross_every=2, cross_offset=2), "cross_offset"),
    (dict(n_layers=4, cross_every=2, cross_layers=[1]), "exclusive"),
    (dict(n_layers=4, all_self=True, cross_layers=[1]), "all_self"),
])
def test_malformed_plans_name_the_field(kwargs, field):
    with pytest.raises(PlanError, match=field):
        LayerPlan(**kwargs)
