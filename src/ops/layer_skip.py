"""Gated layer skipping: an optional layer runs only for the samples whose gate is on.

`gather_rows` picks the active samples' rows, the layer runs on them, and `scatter_add_rows` adds
its output back to the residual stream in one pass (out = x; out[index] += delta). Both call the
C++/CUDA ops when the extension is built, else their pure-PyTorch references; both have backward.
Rows are flattened samples: x (N, D) with D = everything after the batch dim.
"""
from __future__ import annotations

import torch

from src.ops.extension import extension_available

# Resolved once at import: a module constant, so torch.compile traces the chosen path without a graph break.
USE_EXTENSION = extension_available()


def _check_rows(x: torch.Tensor, index: torch.Tensor) -> None:
    assert x.dim() == 2 and index.dim() == 1 and index.dtype == torch.int64, (
        f"x (N, D) and index (K,) int64 expected; got {tuple(x.shape)}, {tuple(index.shape)} {index.dtype}")


def gather_rows_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, D), index (K,) int64 -> (K, D)."""
    _check_rows(x, index)
    return x.index_select(0, index)


def scatter_add_rows_reference(x: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x (N, D), index (K,) int64, delta (K, D) -> (N, D). Duplicate indices accumulate."""
    _check_rows(x, index)
    assert delta.shape == (index.shape[0], x.shape[1]), f"delta must be (K, D); got {tuple(delta.shape)}"
    return x.index_add(0, index, delta)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, D), index (K,) int64 -> (K, D)."""
    if USE_EXTENSION:
        return torch.ops.visor.gather_rows(x, index)
    return gather_rows_reference(x, index)


def scatter_add_rows(x: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x (N, D), index (K,) int64, delta (K, D) -> (N, D)."""
    if USE_EXTENSION:
        return torch.ops.visor.scatter_add_rows(x, index, delta)
    return scatter_add_rows_reference(x, index, delta)
