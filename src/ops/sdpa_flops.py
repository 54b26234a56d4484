"""FLOP formulas for scaled-dot-product attention, causal masks counted as computed.

The project's convention (src/flops.py): a causal S x S attention costs half the full square, as
FlashAttention's own FLOP formulas count it (`flops / 2 if causal`, benchmarks/benchmark_flash_attention.py
in Dao-AILab/flash-attention), since its kernels, like torch's CPU flash kernel, skip the masked
blocks. torch's `FlopCounterMode` counts the full square whatever the mask, and (checked in 2.14.1)
has no formula at all for the CPU flash kernel that `F.scaled_dot_product_attention` dispatches to on
CPU (it counted 0). `SDPA_FLOP_FORMULAS` fills both gaps: `src.flops.measured_flops` passes it to the
counter as its custom mapping, so measured and analytic FLOPs use the same convention.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

# op name -> (index of `is_causal` among the arguments after q, k, v; forward or backward)
_FORWARD_OPS = {"_scaled_dot_product_flash_attention_for_cpu": 1, "_scaled_dot_product_flash_attention": 1,
                "_scaled_dot_product_efficient_attention": 3, "_scaled_dot_product_cudnn_attention": 3}
# backward ops take (grad_out, q, k, v, ...); the index counts from after v
_BACKWARD_OPS = {"_scaled_dot_product_flash_attention_for_cpu_backward": 3,
                 "_scaled_dot_product_flash_attention_backward": 7,
                 "_scaled_dot_product_efficient_attention_backward": 7}


def _is_causal(args, kwargs, index: int) -> bool:
    if "is_causal" in kwargs:
        return bool(kwargs["is_causal"])
    return bool(args[index]) if len(args) > index and isinstance(args[index], bool) else False


def _forward_formula(index: int):
    def formula(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        flops = sdpa_flop_count(q_shape, k_shape, v_shape)
        return flops // 2 if _is_causal(args, kwargs, index) else flops
    return formula


def _backward_formula(index: int):
    def formula(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        flops = sdpa_backward_flop_count(grad_out_shape, q_shape, k_shape, v_shape)
        return flops // 2 if _is_causal(args, kwargs, index) else flops
    return formula


SDPA_FLOP_FORMULAS = {}
for _name, _index in _FORWARD_OPS.items():
    if hasattr(torch.ops.aten, _name):
        SDPA_FLOP_FORMULAS[getattr(torch.ops.aten, _name)] = _forward_formula(_index)
for _name, _index in _BACKWARD_OPS.items():
    if hasattr(torch.ops.aten, _name):
        SDPA_FLOP_FORMULAS[getattr(torch.ops.aten, _name)] = _backward_formula(_index)
