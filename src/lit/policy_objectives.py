"""How the budget policy learns: REINFORCE with a baseline and an entropy bonus, or pseudo-labels.

REINFORCE (the default; Williams 1992): sample a budget per sample from the router, reward =
answer quality - lambda x (the budget's FLOPs / the largest budget's FLOPs), and minimise
-(reward - baseline) log pi(budget) - beta x entropy. The baseline is a moving average of the
reward, or the reward of the router's own greedy choice (self-critical, Rennie et al. 2017).

Pseudo-labels (the paper's): the label of a sample is the cheapest budget whose score reaches
`rel` (0.99) of the best budget's score on that sample; trained with cross-entropy.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def reinforce_loss(logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, baseline: torch.Tensor,
                   entropy_coef: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits (B, K), actions (B,) int64, rewards (B,), baseline scalar or (B,) -> (loss, mean entropy)."""
    assert logits.dim() == 2 and actions.shape == rewards.shape == (logits.shape[0],), (
        f"logits (B, K), actions (B,), rewards (B,) expected; got {tuple(logits.shape)}, {tuple(actions.shape)}, "
        f"{tuple(rewards.shape)}")
    logp = F.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, actions[:, None]).squeeze(1)
    advantage = (rewards - baseline).detach().float()
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return -(advantage * chosen).mean() - entropy_coef * entropy, entropy


class MovingAverageBaseline:
    """b <- m b + (1 - m) mean(reward); starts at the first batch's mean."""

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"policy.baseline_momentum must be in [0, 1), got {momentum}")
        self.momentum, self.value = momentum, None

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        """The baseline for this batch (before it is updated with it)."""
        mean = rewards.detach().float().mean()
        current = mean if self.value is None else self.value
        self.value = mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * mean
        return current


def pseudo_labels(scores: torch.Tensor, costs: torch.Tensor, rel: float = 0.99) -> torch.Tensor:
    """scores (B, K) higher is better, costs (K,) -> labels (B,) int64: the cheapest budget with
    score >= best - (1 - rel) |best| (= rel x best for non-negative scores); among equally cheap
    budgets the first."""
    assert scores.dim() == 2 and costs.shape == (scores.shape[1],), (
        f"scores (B, K) and costs (K,) expected; got {tuple(scores.shape)}, {tuple(costs.shape)}")
    best = scores.max(dim=1, keepdim=True).values  # (B, 1)
    ok = scores >= best - (1 - rel) * best.abs()  # (B, K)
    key = torch.where(ok, costs.to(scores.dtype).expand_as(scores), torch.full_like(scores, float("inf")))
    return key.argmin(dim=1)  # argmin returns the first minimum: ties go to the lower index
