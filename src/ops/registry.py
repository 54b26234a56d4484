"""Python-side registrations for the C++ ops: fake (meta) kernels for torch.compile and autograd."""
from __future__ import annotations

import torch


@torch.library.register_fake("visor::scatter_add_rows")
def _scatter_add_rows_fake(x, index, delta):
    torch._check(x.dim() == 2 and delta.dim() == 2, lambda: "x (N, D) and delta (K, D) expected")
    torch._check(index.shape[0] == delta.shape[0], lambda: "index must be (K,)")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _scatter_setup(ctx, inputs, output):
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return grad, None, grad.index_select(0, index)


torch.library.register_autograd("visor::scatter_add_rows", _scatter_backward, setup_context=_scatter_setup)
