"""The VISOR cross-attention sublayer: text queries read the (not updated) visual tokens.

Pre-norm (separate RMSNorms for text queries and visual keys/values), GQA like the host layer,
no RoPE (visual order comes from the conv positional embedding), output projection and a
tanh gate initialised at 0, so inserting the sublayer leaves the LLM's function unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from src.models.norm import RMSNorm
from src.ops.attention import cross_attention


class CrossAttention(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool, norm_eps: float
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.norm_text = RMSNorm(d_model, norm_eps)
        self.norm_visual = RMSNorm(d_model, norm_eps)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def init_from_host(self, host_attention: nn.Module, host_norm: RMSNorm) -> None:
        """Copy the host layer's attention projections and input norm (paper's initialisation)."""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mine, theirs = getattr(self, name), getattr(host_attention, name)
            mine.weight.copy_(theirs.weight)
            if mine.bias is not None:
                mine.bias.copy_(theirs.bias)
        self.norm_text.weight.copy_(host_norm.weight)
        self.norm_visual.weight.copy_(host_norm.weight)

    def forward(
        self, text: torch.Tensor, visual: torch.Tensor, kv_lens: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """text (B, T, d), visual (B, V, d), kv_lens (B,) or None -> updated text (B, T, d)."""
        B, T, _ = text.shape
        V = visual.shape[1]
        h = self.norm_text(text)
        hv = self.norm_visual(visual)
        q = self.q_proj(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(hv).view(B, V, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, V, hd)
        v = self.v_proj(hv).view(B, V, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, V, hd)
        y = cross_attention(q, k, v, kv_lens)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return text + torch.tanh(self.gate) * self.o_proj(y)
