"""LayerPlan: which kind each decoder layer is (`text`, `cross` or `self`).

Written in YAML either as explicit lists::

    plan: {n_layers: 6, self_layers: [0], cross_layers: [1, 3, 5]}

or as a rule (every layer not named is `text`)::

    plan: {n_layers: 6, self_layers: [0], cross_every: 2, cross_offset: 1}

`all_self: true` is the original LVLM (every layer `self`). Validation happens in
`__post_init__`, so a bad plan fails when the YAML is parsed, with the field named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

KINDS = ("text", "cross", "self")


class PlanError(ValueError):
    """A malformed layer plan; the message names the offending field."""


@dataclass
class LayerPlan:
    n_layers: int
    self_layers: List[int] = field(default_factory=list)
    cross_layers: List[int] = field(default_factory=list)
    cross_every: Optional[int] = None
    cross_offset: int = 0
    all_self: bool = False

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

    @property
    def kinds(self) -> List[str]:
        """The kind of every layer, index-aligned with the decoder layers."""
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
