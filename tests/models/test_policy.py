"""The budget router (src/models/policy.py): its features, its statistics and its inference modes."""
import pytest
import torch

from src.models.policy import BudgetPolicy, select_budgets


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
