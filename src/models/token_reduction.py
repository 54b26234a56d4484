"""Token reducers applied to the visual tokens before the LLM (baselines; stack with VISOR)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
import torch.nn.functional as F


class TokenReducer(nn.Module):
    """Base class: (B, V, d) visual tokens on an (h, w) grid -> (B, V', d), new grid."""

    def output_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        raise NotImplementedError

    def forward(self, visual: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


class AvgPoolReducer(TokenReducer):
    """s x s average pooling over the visual token grid (LLaVA-OV's 2x2 bilinear pooling's cousin)."""

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"token_reducer.size must be >= 1, got {size}")
        self.size = size

    def output_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        h, w = grid
        if h % self.size or w % self.size:
            raise ValueError(f"token_reducer.size={self.size} does not divide the visual grid {grid}")
        return h // self.size, w // self.size

    def forward(self, visual: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        B, V, d = visual.shape
        h, w = grid
        assert V == h * w, f"visual has {V} tokens, grid {grid} says {h * w}"
        x = visual.transpose(1, 2).reshape(B, d, h, w)
        x = F.avg_pool2d(x, self.size)  # (B, d, h/s, w/s)
        return x.flatten(2).transpose(1, 2)  # (B, V/s^2, d)
