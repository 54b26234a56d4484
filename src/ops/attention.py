"""The single attention dispatch point of the model.

Every attention in the decoder goes through `causal_self_attention` or `cross_attention`, so
the fused kernels from `csrc/` slot in here without touching the model. Until then both use
`torch.nn.functional.scaled_dot_product_attention` (the pure-PyTorch reference).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "expected (B, H, S, hd) tensors"
    assert k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    assert q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1], f"q {tuple(q.shape)} vs k {tuple(k.shape)}"
    assert q.shape[1] % k.shape[1] == 0, f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}"


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention. q (B, H, S, hd); k, v (B, Hkv, S, hd) with H % Hkv == 0 -> (B, H, S, hd)."""
    _check_heads(q, k, v)
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
    _check_heads(q, k, v)
    mask = None
    if kv_lens is not None:
        assert kv_lens.shape == (q.shape[0],), f"kv_lens must be (B,), got {tuple(kv_lens.shape)}"
        mask = torch.arange(k.shape[2], device=k.device)[None, :] < kv_lens[:, None]  # (B, V)
        mask = mask[:, None, None, :]  # (B, 1, 1, V)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    if kv_lens is not None:
        out = out.masked_fill((kv_lens == 0)[:, None, None, None], 0.0)
    return out
