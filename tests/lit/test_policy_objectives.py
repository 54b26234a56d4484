"""The router's learning rules (src/lit/policy_objectives.py): REINFORCE and pseudo-labels."""
import torch

from src.lit.policy_objectives import MovingAverageBaseline, pseudo_labels, reinforce_loss


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
