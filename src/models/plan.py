"""LayerPlan: which kind each decoder layer is (`text`, `cross` or `self`).

Written in YAML either as explicit lists::

    plan: {n_layers: 6, self_layers: [0], cross_layers: [1, 3, 5]}

or as a rule (every layer not named is `text`)::

    plan: {n_layers: 6, self_layers: [0], cross_every: 2, cross_offset: 1}

`all_self: true` is the original LVLM (every layer `self`). Validation happens in
`__post_init__`, so a bad plan fails when the YAML is parsed, with the field named.

Budgets. Some `self` layers may be optional (`optional_self`); a budget is one feasible set of
active optional self layers, and a skipped optional layer runs its base kind (`skip_kind`: `cross`
or `text`)::

    plan: {n_layers: 6, self_layers: [0, 2, 4], optional_self: [2, 4], cross_layers: [1, 3, 5],
           budgets: [[], [2], [2, 4]], skip_kind: cross}

Without `budgets`, the feasible sets are the nested prefixes of `optional_self` ([], [o1],
[o1, o2], ...). Budgets are indexed in the order given; `largest`/`smallest` are by the number of
active layers (ties: the first listed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch

KINDS = ("text", "cross", "self")


class PlanError(ValueError):
    """A malformed layer plan; the message names the offending field."""


class BudgetError(IndexError, ValueError):
    """A budget index out of range: an IndexError where a budget indexes the plan, a ValueError where
    a config field names one (the message names the field)."""


@dataclass
class LayerPlan:
    n_layers: int
    self_layers: List[int] = field(default_factory=list)
    cross_layers: List[int] = field(default_factory=list)
    cross_every: Optional[int] = None
    cross_offset: int = 0
    all_self: bool = False
    optional_self: List[int] = field(default_factory=list)
    budgets: Optional[List[List[int]]] = None
    skip_kind: str = "cross"

    def __post_init__(self) -> None:
        if not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise PlanError(f"plan.n_layers must be a positive integer, got {self.n_layers!r}")
        if self.all_self:
            if self.self_layers or self.cross_layers or self.cross_every:
                raise PlanError("plan.all_self: true excludes self_layers, cross_layers and cross_every")
            self.self_layers = list(range(self.n_layers))
        if self.cross_every is not None:
            if self.cross_layers:
                raise PlanError("plan.cross_every and plan.cross_layers are exclusive: give one of them")
            if self.cross_every < 1:
                raise PlanError(f"plan.cross_every must be >= 1, got {self.cross_every}")
            if not 0 <= self.cross_offset < self.cross_every:
                raise PlanError(
                    f"plan.cross_offset must be in [0, cross_every={self.cross_every}), got {self.cross_offset}"
                )
            self.cross_layers = [
                i for i in range(self.cross_offset, self.n_layers, self.cross_every) if i not in self.self_layers
            ]
        for name in ("self_layers", "cross_layers"):
            layers = getattr(self, name)
            for i in layers:
                if not isinstance(i, int) or not 0 <= i < self.n_layers:
                    raise PlanError(f"plan.{name}: layer index {i!r} is out of range [0, {self.n_layers})")
            if len(set(layers)) != len(layers):
                raise PlanError(f"plan.{name} lists a layer twice: {layers}")
            setattr(self, name, sorted(layers))
        both = sorted(set(self.self_layers) & set(self.cross_layers))
        if both:
            raise PlanError(f"plan: layers {both} are given two kinds (in self_layers and cross_layers)")
        if not self.self_layers and not self.cross_layers:
            raise PlanError("plan is empty: no self_layers and no cross_layers, so text never reads the image")
        self._check_budgets()

    def _check_budgets(self) -> None:
        if self.skip_kind not in ("cross", "text"):
            raise PlanError(f"plan.skip_kind must be 'cross' or 'text', got {self.skip_kind!r}")
        for i in self.optional_self:
            if i not in self.self_layers:
                raise PlanError(f"plan.optional_self: layer {i!r} is not in self_layers {self.self_layers}")
        if len(set(self.optional_self)) != len(self.optional_self):
            raise PlanError(f"plan.optional_self lists a layer twice: {self.optional_self}")
        self.optional_self = sorted(self.optional_self)
        if self.budgets is None:
            self.budgets = [self.optional_self[:n] for n in range(len(self.optional_self) + 1)]
            return
        if not self.optional_self:
            raise PlanError("plan.budgets given but plan.optional_self is empty: there is nothing to choose")
        if not self.budgets:
            raise PlanError("plan.budgets is empty: give at least one feasible set of optional self layers")
        seen = set()
        for k, budget in enumerate(self.budgets):
            if not isinstance(budget, (list, tuple)):
                raise PlanError(f"plan.budgets[{k}] must be a list of layer indices, got {budget!r}")
            for i in budget:
                if i not in self.optional_self:
                    raise PlanError(f"plan.budgets[{k}]: layer {i!r} is not in optional_self {self.optional_self}")
            key = tuple(sorted(set(budget)))
            if len(key) != len(budget):
                raise PlanError(f"plan.budgets[{k}] lists a layer twice: {budget}")
            if key in seen:
                raise PlanError(f"plan.budgets[{k}] = {budget} is listed twice")
            seen.add(key)
        self.budgets = [sorted(b) for b in self.budgets]

    # --- budgets ------------------------------------------------------------------------------

    @property
    def n_budgets(self) -> int:
        return len(self.budgets)

    @property
    def largest_budget(self) -> int:
        sizes = [len(b) for b in self.budgets]
        return sizes.index(max(sizes))

    @property
    def smallest_budget(self) -> int:
        sizes = [len(b) for b in self.budgets]
        return sizes.index(min(sizes))

    def budget_index(self, budget: Optional[int] = None, field: str = "") -> int:
        """None (the largest budget) or a budget index -> the index, range-checked; the one place a
        budget's default and range are decided. field: the config field named in the error."""
        if budget is None:
            return self.largest_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget < self.n_budgets:
            raise BudgetError(f"{field + ': ' if field else ''}budget {budget!r} out of range [0, {self.n_budgets})")
        return budget

    def resolve(self, budget: Union[None, int, torch.Tensor], batch: int,
                device: Optional[torch.device] = None) -> torch.Tensor:
        """None (the largest) / one index / (B,) integer indices -> (B,) int64 budget indices, validated."""
        if budget is None or isinstance(budget, int):
            return torch.full((batch,), self.budget_index(budget), dtype=torch.long, device=device)
        if not (isinstance(budget, torch.Tensor) and budget.shape == (batch,) and not budget.is_floating_point()):
            raise ValueError(f"budget must be None, an int or a (B,) = ({batch},) integer tensor; got {budget!r}")
        if not torch.compiler.is_compiling() and bool(((budget < 0) | (budget >= self.n_budgets)).any()):
            raise BudgetError(f"budget values {budget.tolist()} out of range [0, {self.n_budgets})")
        return budget.to(device=device, dtype=torch.long)

    def members(self) -> torch.Tensor:
        """(n_budgets, n_layers) bool: is layer i's optional self path on under budget k."""
        member = torch.zeros(self.n_budgets, self.n_layers, dtype=torch.bool)
        for k, budget in enumerate(self.budgets):
            member[k, budget] = True
        return member

    @property
    def first_optional(self) -> Optional[int]:
        """Index of the first optional self layer (where the budget policy sits), or None."""
        return self.optional_self[0] if self.optional_self else None

    @property
    def cross_sublayers(self) -> List[int]:
        """Layers that own a cross sublayer: the cross layers, and optional self layers skipped to `cross`."""
        extra = self.optional_self if self.skip_kind == "cross" else []
        return sorted(set(self.cross_layers) | set(extra))

    def budget_kinds(self, budget: Optional[int] = None) -> List[str]:
        """Every layer's kind when budget `budget` (None: the largest) runs (skipped optional layers
        take `skip_kind`)."""
        budget = self.budget_index(budget)
        kinds = self.kinds
        for i in self.optional_self:
            if i not in self.budgets[budget]:
                kinds[i] = self.skip_kind
        return kinds

    def budget_name(self, budget: Optional[int] = None) -> str:
        return "".join(k[0].upper() for k in self.budget_kinds(budget))

    @property
    def kinds(self) -> List[str]:
        """The kind of every layer (optional self layers counted as `self`: the largest budget)."""
        out = ["text"] * self.n_layers
        for i in self.cross_layers:
            out[i] = "cross"
        for i in self.self_layers:
            out[i] = "self"
        return out

    def count(self, kind: str) -> int:
        return self.kinds.count(kind)

    def __str__(self) -> str:
        return "".join(k[0].upper() for k in self.kinds)  # e.g. "SCTCTC"
