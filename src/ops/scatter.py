"""Gated layer skipping's scatter: out = x; out[index] += delta, with backward.

`scatter_add_rows` calls the C++/CUDA op when the extension is built, else the reference."""
from __future__ import annotations

import torch

from src.ops.extension import extension_available


def scatter_add_rows_reference(x: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x (N, D), index (K,) int64, delta (K, D) -> (N, D). Duplicate indices accumulate."""
    assert x.dim() == 2 and delta.dim() == 2 and index.shape == (delta.shape[0],), (
        f"x (N, D), index (K,), delta (K, D) expected; got {tuple(x.shape)}, {tuple(index.shape)}, {tuple(delta.shape)}")
    return x.index_add(0, index, delta)


def scatter_add_rows(x: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x (N, D), index (K,) int64, delta (K, D) -> (N, D)."""
    if extension_available():
        return torch.ops.visor.scatter_add_rows(x, index, delta)
    return scatter_add_rows_reference(x, index, delta)
