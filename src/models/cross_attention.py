"""The VISOR cross-attention sublayer: text queries read the (not updated) visual tokens.

Pre-norm (separate RMSNorms for text queries and visual keys/values), GQA like the host layer,
output projection and a tanh gate initialised at 0, so inserting the sublayer leaves the LLM's
function unchanged.

Positions: by default no RoPE (DESIGN.md; visual order comes from the conv positional embedding
and the encoder's own position embedding). With `rope=True` the queries and keys are rotated at
their original LVLM positions (text from V on, visual 0..V-1), so a host-initialised sublayer
starts as exactly the host layer's text->visual attention (relative offsets included); an option
for the ablation of whether cross layers need the host's positional code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from src.models.norm import RMSNorm
from src.models.rope import apply_rope
from src.ops.attention import cross_attention


class CrossAttention(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool, norm_eps: float,
        rope: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope = n_heads, n_kv_heads, head_dim, rope
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

    def queries(self, text: torch.Tensor, cos: Optional[torch.Tensor] = None,
                sin: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text (B, T, d) -> q (B, H, T, hd); cos/sin (B or 1, 1, T, hd): the text positions' RoPE
        tables, required with `rope` and ignored without."""
        B, T, _ = text.shape
        q = self.q_proj(self.norm_text(text)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        return self._rotate(q, cos, sin)

    def visual_kv(self, visual: torch.Tensor, cos: Optional[torch.Tensor] = None,
                  sin: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """visual (B, V, d) -> k, v (B, Hkv, V, hd) each; cos/sin (B or 1, 1, V, hd): the visual
        positions' RoPE tables, required with `rope` and ignored without."""
        hv = self.norm_visual(visual)
        return self._keys(hv, cos, sin), self._kv_heads(self.v_proj(hv))

    def visual_keys(self, visual: torch.Tensor, cos: Optional[torch.Tensor] = None,
                    sin: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The keys alone (what FastV-style ranking needs): visual (B, V, d) -> k (B, Hkv, V, hd)."""
        return self._keys(self.norm_visual(visual), cos, sin)

    def _keys(self, hv: torch.Tensor, cos, sin) -> torch.Tensor:
        return self._rotate(self._kv_heads(self.k_proj(hv)), cos, sin)

    def _kv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V, Hkv * hd) -> (B, Hkv, V, hd)."""
        return x.view(x.shape[0], x.shape[1], self.n_kv_heads, self.head_dim).transpose(1, 2)

    def attend(self, text: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text (B, T, d) and its q (B, H, T, hd) over k/v (B, Hkv, V, hd) -> updated text (B, T, d)."""
        B, T, _ = text.shape
        y = cross_attention(q, k, v, kv_lens)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return text + torch.tanh(self.gate) * self.o_proj(y)

    def forward(
        self, text: torch.Tensor, visual: torch.Tensor, kv_lens: Optional[torch.Tensor] = None,
        rope_text: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        rope_visual: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """text (B, T, d), visual (B, V, d), kv_lens (B,) or None -> updated text (B, T, d).
        rope_text / rope_visual: (cos, sin) (B or 1, 1, T or V, hd), required with `rope`."""
        q = self.queries(text, *(rope_text or (None, None)))
        k, v = self.visual_kv(visual, *(rope_visual or (None, None)))
        return self.attend(text, q, k, v, kv_lens)

    def _rotate(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.rope:
            return x
        if cos is None or sin is None:
            raise ValueError("this cross sublayer uses RoPE (cross_rope=true): pass the positions' cos/sin tables")
        assert cos.shape[-2] == x.shape[-2] and cos.shape[-1] == x.shape[-1], (
            f"RoPE tables (..., {x.shape[-2]}, {x.shape[-1]}) expected, got {tuple(cos.shape)}")
        return apply_rope(x, cos, sin)
