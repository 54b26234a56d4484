"""Python-side registrations for the C++ ops: fake (meta) kernels for torch.compile, and autograd."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula


@torch.library.register_fake("visor::scatter_add_rows")
def _scatter_add_rows_fake(x, index, delta):
    torch._check(x.dim() == 2 and delta.dim() == 2, lambda: "x (N, D) and delta (K, D) expected")
    torch._check(index.shape[0] == delta.shape[0], lambda: "index must be (K,)")
    return x.new_empty(x.shape)


def _scatter_setup(ctx, inputs, output):
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return grad, None, torch.ops.visor.gather_rows(grad, index)


torch.library.register_autograd("visor::scatter_add_rows", _scatter_backward, setup_context=_scatter_setup)


@torch.library.register_fake("visor::gather_rows")
def _gather_rows_fake(x, index):
    torch._check(x.dim() == 2 and index.dim() == 1, lambda: "x (N, D) and index (K,) expected")
    return x.new_empty((index.shape[0], x.shape[1]))


def _gather_setup(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.n_rows = x.shape[0]


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    zeros = grad.new_zeros((ctx.n_rows, grad.shape[1]))
    return torch.ops.visor.scatter_add_rows(zeros, index, grad), None


torch.library.register_autograd("visor::gather_rows", _gather_backward, setup_context=_gather_setup)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("visor::cross_attention")
def _cross_attention_fake(q, k, v, kv_lens, scale):
    torch._check(q.dim() == 4 and k.dim() == 4 and k.shape == v.shape, lambda: "q (B,H,T,hd), k, v (B,Hkv,V,hd)")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads not a multiple of kv heads")
    B, H, T, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=_accumulation_dtype(q.dtype))


@torch.library.register_fake("visor::cross_attention_backward")
def _cross_attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, kv_lens, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _cross_attention_setup(ctx, inputs, output):
    q, k, v, kv_lens, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lens)
    ctx.scale = scale


def _cross_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_lens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.visor.cross_attention_backward(grad_out, grad_lse, q, k, v, out, lse, kv_lens, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("visor::cross_attention", _cross_attention_backward,
                                setup_context=_cross_attention_setup)


# FLOPs for torch.utils.flop_counter.FlopCounterMode (src/flops.py is checked against it). Counted as
# torch counts scaled_dot_product_attention: forward Q K^T and P V; backward dP = dO V^T, dV = P^T dO,
# dQ = dS K and dK = dS^T Q (the recomputation of the scores is not counted).
@register_flop_formula(torch.ops.visor.cross_attention)
def _cross_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    B, H, T, hd = q_shape
    return 2 * 2 * B * H * T * k_shape[2] * hd


@register_flop_formula(torch.ops.visor.cross_attention_backward)
def _cross_attention_backward_flops(grad_out_shape, grad_lse_shape, q_shape, k_shape, *args, out_shape=None,
                                    **kwargs) -> int:
    B, H, T, hd = q_shape
    return 4 * 2 * B * H * T * k_shape[2] * hd
