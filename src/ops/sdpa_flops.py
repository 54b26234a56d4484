"""FLOP formulas for the CPU attention kernel, which torch's flop counter lacks.

torch's `FlopCounterMode` (checked in 2.14.1) has formulas for the CUDA attention kernels (flash,
efficient, cuDNN) but none for the CPU flash kernel that `F.scaled_dot_product_attention` dispatches
to on CPU, so on CPU it counted that attention as 0 FLOPs: the LLM's analytic counts no longer
matched it, and a ViT encoder's measured FLOPs (src/flops.py) left its attention out. Registered here
with torch's own SDPA formulas, only where torch has no formula of its own; importing src.ops does it.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_SDPA_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

if _CPU_SDPA is not None and _CPU_SDPA not in flop_registry:
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

if _CPU_SDPA_BACKWARD is not None and _CPU_SDPA_BACKWARD not in flop_registry:
    @register_flop_formula(_CPU_SDPA_BACKWARD)
    def _cpu_sdpa_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, q_shape, k_shape, v_shape)
