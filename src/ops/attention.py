"""The single attention dispatch point of the model.

Every attention in the decoder goes through `causal_self_attention` or `cross_attention`.
Cross-attention (text over image) runs the fused `visor::cross_attention` op from `csrc/` when the
extension is built, its pure-PyTorch reference otherwise (src/ops/cross_attention.py). Causal
self-attention uses `torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from src.ops.cross_attention import check_heads, cross_attention_with_lse


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention. q (B, H, S, hd); k, v (B, Hkv, S, hd) with H % Hkv == 0 -> (B, H, S, hd)."""
    check_heads(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Text queries over visual keys, no causal mask.

    q (B, H, T, hd); k, v (B, Hkv, V, hd); kv_lens (B,) valid visual tokens per sample or None
    -> (B, H, T, hd). A sample with kv_lens == 0 gets a zero output.
    """
    return cross_attention_with_lse(q, k, v, kv_lens)[0]
