"""Text-over-image cross-attention: the C++/CUDA op `visor::cross_attention` and its reference.

q (B, H, T, hd) text queries; k, v (B, Hkv, V, hd) visual keys/values, H % Hkv == 0 (grouped-query
attention, k/v never expanded); kv_lens (B,) valid visual tokens per sample (clamped to [0, V]) or
None; no mask otherwise. Returns out (B, H, T, hd) in q's dtype and lse (B, H, T), the log-sum-exp
of the scaled scores in the accumulation type (float32; float64 for float64 inputs), so partial
results over key ranges can be merged. A sample with no valid key gets out = 0, lse = -inf and zero
gradients.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from src.ops.extension import extension_available

# Resolved once at import: a module constant, so torch.compile traces the chosen path without a graph break.
USE_EXTENSION = extension_available()


def check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, H, S, hd), k and v (B, Hkv, S', hd) with H a multiple of Hkv (every attention of the model)."""
    assert q.dim() == 4 and k.dim() == 4 and k.shape == v.shape, (
        f"q (B, H, S, hd), k and v (B, Hkv, S', hd) expected; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    assert q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3], f"q {tuple(q.shape)} vs k {tuple(k.shape)}"
    assert k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0, f"query heads {q.shape[1]} not a multiple of {k.shape[1]}"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: Optional[torch.Tensor]) -> None:
    check_heads(q, k, v)
    assert kv_lens is None or kv_lens.shape == (q.shape[0],), f"kv_lens must be (B,), got {tuple(kv_lens.shape)}"


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              kv_lens: Optional[torch.Tensor] = None,
                              scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch, same contract as the op (module docstring)."""
    _check(q, k, v, kv_lens)
    B, H, T, hd = q.shape
    Hkv, V = k.shape[1], k.shape[2]
    scale = hd ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = q.to(acc).reshape(B, Hkv, (H // Hkv) * T, hd)  # head hkv * G + g, query t -> row g * T + t
    s = rows @ k.to(acc).transpose(-1, -2) * scale  # (B, Hkv, G*T, V)
    if kv_lens is not None:
        valid = torch.arange(V, device=k.device)[None, :] < kv_lens.clamp(0, V)[:, None]  # (B, V)
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, G*T); -inf for a sample with no valid key
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # rows with no key: all 0
    out = (p @ v.to(acc)).reshape(B, H, T, hd).to(q.dtype)
    return out, lse.reshape(B, H, T)


def cross_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             kv_lens: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op when the extension is built, else the reference. -> (out (B, H, T, hd), lse (B, H, T))."""
    if not USE_EXTENSION:
        return cross_attention_reference(q, k, v, kv_lens, scale)
    _check(q, k, v, kv_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.visor.cross_attention(q, k, v, kv_lens, scale)
