"""torchmetrics for VQA answers."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced exact match: every answer token (and <eos>) is the argmax.

    Equivalent to greedy decoding reproducing the answer exactly and stopping.
    logits (B, T, vocab), or (N, vocab) at the answer positions only (labels != -100, row-major, as
    `VisorLVLM.logits(..., logits_at=)` gives them); labels (B, T) with -100 off the answer -> (B,) bool."""
    mask = labels != -100
    if logits.dim() == 3:
        assert logits.shape[:2] == labels.shape, f"logits {tuple(logits.shape)} vs labels {tuple(labels.shape)}"
        logits = logits[mask]
    assert logits.shape[0] == int(mask.sum()), (
        f"logits for {logits.shape[0]} answer positions, labels mark {int(mask.sum())}")
    wrong = torch.zeros_like(mask)
    wrong[mask] = logits.argmax(-1) != labels[mask]
    return ~wrong.any(dim=1) & mask.any(dim=1)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of each sample's answer: logits (N, vocab) at the answer positions (as for
    `exact_match`), labels (B, T) -> (B,) (0 for a sample without answer tokens)."""
    mask = labels != -100
    nll = F.cross_entropy(logits.float(), labels[mask], reduction="none")  # (N,)
    per_sample = nll.new_zeros(labels.shape[0]).index_add(0, mask.nonzero()[:, 0], nll)
    return per_sample / mask.sum(1).clamp_min(1)


class GroupedAccuracy(Metric):
    """Accuracy per named group (task, difficulty, budget, ...) plus overall."""

    full_state_update = False

    def __init__(self, groups: Sequence[str]) -> None:
        super().__init__()
        if len(set(groups)) != len(groups) or not groups:
            raise ValueError(f"groups must be unique and non-empty, got {list(groups)}")
        self.groups = list(groups)
        self.index = {g: i for i, g in enumerate(self.groups)}
        # integer counts: exact at any size, and left alone when a bf16 model converts its floats
        self.add_state("correct", default=torch.zeros(len(groups), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(groups), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, groups: Sequence[str]) -> None:
        """correct (B,) bool, groups: B group names."""
        assert correct.shape == (len(groups),), f"correct {tuple(correct.shape)} vs {len(groups)} groups"
        unknown = set(groups) - set(self.index)
        if unknown:
            raise KeyError(f"unknown groups {sorted(unknown)}; known: {self.groups}")
        idx = torch.tensor([self.index[g] for g in groups], device=self.correct.device)
        self.correct.index_add_(0, idx, correct.long())
        self.total.index_add_(0, idx, torch.ones_like(idx))

    def compute(self) -> Dict[str, torch.Tensor]:
        correct, total = self.correct.double(), self.total.double()
        out = {g: (correct[i] / total[i]).float() for i, g in enumerate(self.groups) if total[i] > 0}
        out["all"] = (correct.sum() / total.sum().clamp(min=1)).float()
        return out


def accuracy_logs(tasks: Dict[str, torch.Tensor], difficulty: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Log keys of a validation epoch: val/acc (overall), val/acc/<task>, val/acc/<easy|hard>, from the
    `compute()` of a per-task and a per-difficulty GroupedAccuracy."""
    out = {("val/acc" if name == "all" else f"val/acc/{name}"): acc for name, acc in tasks.items()}
    out.update({f"val/acc/{name}": acc for name, acc in difficulty.items() if name != "all"})
    return out


class MeanFlops(Metric):
    """Mean LLM and total GFLOPs per sample (src.flops.SampleFlops), summed as integers: exact at any
    size, kept in int64 when a bf16 model converts its floats, and summed across ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("llm", "total", "samples"):
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, flops: Sequence) -> None:
        """flops: one SampleFlops per sample."""
        self.llm += sum(int(f.llm) for f in flops)
        self.total += sum(int(f.total) for f in flops)
        self.samples += len(flops)

    def compute(self) -> Dict[str, float]:
        n = max(1, int(self.samples))
        return {"llm": int(self.llm) / n / 1e9, "total": int(self.total) / n / 1e9}
