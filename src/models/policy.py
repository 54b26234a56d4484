"""The budget policy: a small MLP router that picks a budget per sample, and how it is used.

It sits before the first optional self layer and reads the hidden states there: the mean of the
sample's prompt (question) tokens and the mean of its visual tokens. Its output layer starts at
zero, so an untrained router is uniform over budgets.

The pooled features are standardised per feature with running statistics (batch norm without an
affine part), not layer-normed per sample: an LLM's hidden states carry a few large, nearly
constant channels, and a per-sample layer norm leaves the question's task in channels too small
for the router to learn from (docs/findings.md, "The router's features").

Inference modes (`select_budgets`): `policy` (argmax), `max` / `min` (the largest / smallest
budget), a fixed budget index, and `target` — the router's logits shifted by mu x relative cost,
with mu >= 0 the smallest value whose argmax choices meet a mean relative cost over the batch.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn


class BudgetPolicy(nn.Module):
    """(text hidden (B, T, d), text mask (B, T) bool, visual hidden (B, V, d), valid visual tokens per
    sample (B,) or None) -> logits (B, n_budgets)."""

    def __init__(self, d_model: int, n_budgets: int, hidden: int = 128) -> None:
        super().__init__()
        if n_budgets < 2:
            raise ValueError(f"policy: the plan has {n_budgets} budget(s); a router needs at least 2")
        if hidden < 1:
            raise ValueError(f"policy.hidden must be >= 1, got {hidden}")
        self.n_budgets = n_budgets
        self.norm = nn.BatchNorm1d(2 * d_model, affine=False)  # per-feature standardisation, see above
        self.fc1 = nn.Linear(2 * d_model, hidden)
        self.fc2 = nn.Linear(hidden, n_budgets)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, text: torch.Tensor, text_mask: Optional[torch.Tensor], visual: torch.Tensor,
                visual_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        assert text.dim() == 3 and visual.dim() == 3 and text.shape[0] == visual.shape[0], (
            f"text (B, T, d) and visual (B, V, d) expected, got {tuple(text.shape)}, {tuple(visual.shape)}")
        text_pool = self._masked_mean(text, text_mask)
        visual_mask = None if visual_lens is None else (
            torch.arange(visual.shape[1], device=visual.device)[None, :] < visual_lens[:, None])  # (B, V)
        x = torch.cat([text_pool, self._masked_mean(visual, visual_mask)], dim=-1)  # (B, 2d)
        n = self.norm  # batch statistics while training, running ones otherwise and for a training batch of one
        x = n(x) if x.shape[0] > 1 or not self.training else nn.functional.batch_norm(
            x, n.running_mean, n.running_var, training=False, eps=n.eps)
        return self.fc2(nn.functional.gelu(self.fc1(x)))  # (B, n_budgets)

    @staticmethod
    def _masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, N, d), mask (B, N) bool or None (all) -> the mean over the masked tokens (B, d)."""
        if mask is None:
            return x.mean(1)
        assert mask.shape == x.shape[:2], f"mask must be (B, N) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}"
        m = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def select_budgets(logits: torch.Tensor, mode: Union[str, int], costs: torch.Tensor,
                   target: Optional[float] = None, largest: int = -1, smallest: int = 0) -> torch.Tensor:
    """logits (B, K), costs (K,) relative (largest budget = 1) -> budget indices (B,) int64.

    mode: 'policy' | 'max' | 'min' | 'target' (needs `target`, a mean relative cost) | a budget index.
    """
    B, K = logits.shape
    assert costs.shape == (K,), f"costs must be (K,) = ({K},), got {tuple(costs.shape)}"
    if isinstance(mode, int):
        if not 0 <= mode < K:
            raise ValueError(f"policy mode: budget {mode} out of range [0, {K})")
        return torch.full((B,), mode, dtype=torch.long, device=logits.device)
    if mode == "policy":
        return logits.argmax(-1)
    if mode in ("max", "min"):
        k = (largest % K) if mode == "max" else smallest
        return torch.full((B,), k, dtype=torch.long, device=logits.device)
    if mode == "target":
        if target is None:
            raise ValueError("policy mode 'target' needs a target mean relative cost (policy.target_cost)")
        return _meet_target(logits, costs.to(logits), target)
    raise ValueError(f"policy mode must be 'policy', 'max', 'min', 'target' or a budget index, got {mode!r}")


def _meet_target(logits: torch.Tensor, costs: torch.Tensor, target: float, iters: int = 40) -> torch.Tensor:
    """argmax(logits - mu * costs) with the smallest mu >= 0 whose mean cost is <= target (bisection;
    the mean cost of the choices does not increase with mu)."""
    def choose(mu: float) -> torch.Tensor:
        return (logits - mu * costs).argmax(-1)

    if costs[choose(0.0)].mean() <= target:
        return choose(0.0)
    lo, hi = 0.0, 1.0
    while costs[choose(hi)].mean() > target and hi < 1e6:
        lo, hi = hi, hi * 4
    for _ in range(iters):
        mid = (lo + hi) / 2
        if costs[choose(mid)].mean() > target:
            lo = mid
        else:
            hi = mid
    return choose(hi)
