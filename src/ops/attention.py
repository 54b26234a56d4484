"""The single attention dispatch point of the model.

Every attention in the decoder goes through `causal_self_attention`, `cross_attention` or (a cached
decode step) `decode_attention`.
Cross-attention (text over image) runs the fused `visor::cross_attention` op from `csrc/` when the
extension is built, its pure-PyTorch reference otherwise (src/ops/cross_attention.py). Causal
self-attention uses `torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from src.ops.cross_attention import check_heads, cross_attention_with_lse


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention. q (B, H, S, hd); k, v (B, Hkv, S, hd) with H % Hkv == 0 -> (B, H, S, hd).
    key_valid (B, S) bool or None: keys no query may see (padding inside the sequence, as a batch of
    AnyRes images of different token counts has after each one's visual tokens); a padded query
    still sees itself, so its (unused) row stays finite."""
    check_heads(q, k, v)
    gqa = k.shape[1] != q.shape[1]
    if key_valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    S = q.shape[2]
    assert key_valid.shape == (q.shape[0], S) and key_valid.dtype == torch.bool, (
        f"key_valid must be (B, S) = ({q.shape[0]}, {S}) bool, got {tuple(key_valid.shape)} {key_valid.dtype}")
    eye = torch.eye(S, dtype=torch.bool, device=q.device)
    mask = (torch.ones(S, S, dtype=torch.bool, device=q.device).tril() & key_valid[:, None, None, :]) | eye
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One new query per sample over its cached keys (a decode step).

    q (B, H, 1, hd); k, v (B, Hkv, N, hd) with H % Hkv == 0; lengths (B,) int64 in [1, N]: sample b
    sees slots 0..lengths[b]-1, except those where key_valid (B, N) bool (if given) is False
    -> (B, H, 1, hd). The G = H / Hkv query heads of a KV head are one
    (G, hd) x (hd, N) product, so each cached key is read once (no repeat over the group), which is
    what a memory-bound decode step pays for."""
    check_heads(q, k, v)
    B, H, one, hd = q.shape
    assert one == 1 and lengths.shape == (B,), f"q (B, H, 1, hd) and lengths (B,) expected, got {tuple(q.shape)}"
    Hkv, N = k.shape[1], k.shape[2]
    scores = q.reshape(B, Hkv, H // Hkv, hd) @ k.transpose(-1, -2)  # (B, Hkv, G, N)
    scores = scores.float() * hd ** -0.5
    hidden = None
    if bool((lengths < N).any()):
        hidden = torch.arange(N, device=q.device)[None, :] >= lengths[:, None]  # (B, N)
    if key_valid is not None:
        assert key_valid.shape == (B, N), f"key_valid must be (B, N) = ({B}, {N}), got {tuple(key_valid.shape)}"
        hidden = ~key_valid if hidden is None else hidden | ~key_valid
    if hidden is not None:
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).reshape(B, H, 1, hd)
