"""Budgets in the layer plan, per-sample execution, the router's inference modes and learning rules."""
import pytest
import torch

from src.flops import layer_flops, llm_flops
from src.lit.policy_objectives import MovingAverageBaseline, pseudo_labels, reinforce_loss
from src.models.decoder import Decoder
from src.models.plan import LayerPlan, PlanError
from src.models.policy import BudgetPolicy, select_budgets


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


def test_policy_starts_uniform_and_reads_masked_text():
    torch.manual_seed(0)
    pol = BudgetPolicy(16, 3)
    text, visual = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    logits = pol(text, torch.ones(2, 5, dtype=torch.bool), visual)
    assert logits.shape == (2, 3) and torch.all(logits == 0)
    torch.nn.init.normal_(pol.fc2.weight)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    changed = text.clone()
    changed[0, 2:] += 5.0  # masked-out tokens of sample 0
    assert torch.allclose(pol(text, mask, visual)[0], pol(changed, mask, visual)[0])
    with pytest.raises(ValueError, match="at least 2"):
        BudgetPolicy(16, 1)


def test_policy_standardises_each_feature_with_running_statistics():
    """Large channels that are nearly constant across samples (an LLM's hidden states have them) must
    not drown the small per-sample differences: the router's features are standardised per feature."""
    torch.manual_seed(0)
    pol = BudgetPolicy(16, 3)
    torch.nn.init.normal_(pol.fc2.weight)
    text, visual = torch.randn(64, 5, 16), torch.randn(64, 7, 16)
    offset = torch.zeros(16)
    offset[:3] = 30.0  # the same large value in three channels for every sample
    pol.train()
    assert torch.allclose(pol(text, None, visual), pol(text + offset, None, visual + offset), atol=1e-4)
    for _ in range(200):  # running statistics converge to the training features'
        pol(text + offset, None, visual + offset)
    assert torch.allclose(pol.norm.running_mean[:3], torch.full((3,), 30.0) + text.mean(1).mean(0)[:3], atol=1e-3)
    train_logits = pol(text + offset, None, visual + offset)
    pol.eval()
    eval_logits = pol(text + offset, None, visual + offset)
    assert torch.allclose(train_logits, eval_logits, rtol=0.02, atol=0.02)  # batch vs running (unbiased) variance
    assert not torch.allclose(eval_logits, pol(text, None, visual), atol=1e-2)  # eval mode: fixed statistics
    pol.train()
    assert pol(text[:1], None, visual[:1]).shape == (1, 3)  # a batch of one uses the running statistics


def test_select_budgets_modes_and_target_cost():
    costs = torch.tensor([0.25, 0.5, 1.0])
    logits = torch.tensor([[0.0, 0.1, 2.0], [0.0, 1.0, 0.5], [3.0, 0.0, 0.0], [0.0, 0.2, 0.9]])
    assert select_budgets(logits, "policy", costs).tolist() == [2, 1, 0, 2]
    assert select_budgets(logits, "max", costs, largest=2).tolist() == [2] * 4
    assert select_budgets(logits, "min", costs, smallest=0).tolist() == [0] * 4
    assert select_budgets(logits, 1, costs).tolist() == [1] * 4
    free = select_budgets(logits, "target", costs, target=1.0)
    assert free.tolist() == [2, 1, 0, 2]
    for target in (0.7, 0.5, 0.3, 0.25):
        chosen = select_budgets(logits, "target", costs, target=target)
        assert costs[chosen].mean() <= target + 1e-6
    with pytest.raises(ValueError, match="target"):
        select_budgets(logits, "target", costs)


def test_reinforce_converges_to_the_best_arm_of_a_bandit():
    torch.manual_seed(0)
    means = torch.tensor([0.2, 0.5, 0.8, 0.4])  # arm 2 is best
    logits = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    baseline = MovingAverageBaseline(0.9)
    for _ in range(400):
        batch = logits.expand(64, 4)
        actions = torch.distributions.Categorical(logits=batch).sample()
        rewards = means[actions] + 0.1 * torch.randn(64)
        loss, _ = reinforce_loss(batch, actions, rewards, baseline(rewards), entropy_coef=0.001)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probs = logits.softmax(-1)
    assert probs.argmax().item() == 2 and probs[2] > 0.9, probs


def test_pseudo_labels_on_a_hand_made_table():
    costs = torch.tensor([1.0, 2.0, 3.0])
    scores = torch.tensor([
        [0.0, 1.0, 1.0],     # budgets 1 and 2 tie at the best: the cheaper (1)
        [1.0, 1.0, 1.0],     # all tie: the cheapest (0)
        [0.5, 0.995, 1.0],   # budget 1 reaches 99% of the best: 1
        [0.5, 0.98, 1.0],    # only the best qualifies: 2
        [-0.2, -0.1, -0.1005],  # negative scores (e.g. -NLL): within 1% of |best|: 1
    ])
    assert pseudo_labels(scores, costs).tolist() == [1, 0, 1, 2, 1]
    assert pseudo_labels(scores, torch.tensor([2.0, 1.0, 1.0]))[:2].tolist() == [1, 1]  # equal cost: first
