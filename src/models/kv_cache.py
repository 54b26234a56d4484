"""The KV cache that follows the layer kinds (DESIGN: "KV cache in generation").

What each layer keeps for the decode steps (per sample):
  self  : K/V of the whole sequence in its order: the text before the image, the visual tokens
          (their K/V written once, at prefill), the rest of the text
  cross : the cross sublayer's visual K/V (computed once, at prefill) + the ordinary layer's text K/V
  text  : text K/V only
An optional self layer whose budget differs across the batch keeps two row groups, each with a
cache of its own kind over its own rows only. The decoder (`Decoder.run_layers(..., cache=)`)
fills the cache at prefill and reads it at every decode step; this module only holds the tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class RowCache:
    """One layer's cache for one group of samples that run the layer as the same `kind`.

    rows: (B_g,) int64 sample indices into the batch, or None for every sample (B_g = B).
    k, v: (B_g, Hkv, n_visual + capacity, hd): the layer's own attention keys (RoPE applied) and
        values; for `self` text slots t < image_at (KVCache) first, then the n_visual visual tokens,
        then text slot t >= image_at at n_visual + t; for `cross` and `text`, n_visual = 0 (text only).
    cross_k, cross_v: (B_g, Hkv, V_i, hd), the cross sublayer's visual K/V (`cross` only, else None).
    """

    kind: str
    rows: Optional[torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor
    n_visual: int = 0
    cross_k: Optional[torch.Tensor] = None
    cross_v: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, kind: str, rows: Optional[torch.Tensor], n_rows: int, n_kv_heads: int, head_dim: int,
              n_visual: int, capacity: int, like: torch.Tensor) -> "RowCache":
        """Zeros, not empty: masked slots are multiplied by a zero weight, which must not meet a NaN.
        The dtype is the one the K/V projections produce: autocast's where it is on for `like`'s
        device (bf16-mixed keeps a bf16 cache), else `like`'s."""
        shape = (n_rows, n_kv_heads, n_visual + capacity, head_dim)
        device_type = like.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else like.dtype
        return cls(kind, rows, like.new_zeros(shape, dtype=dtype), like.new_zeros(shape, dtype=dtype), n_visual)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: Optional[torch.Tensor]) -> None:
        """Store new keys/values k, v (B_g, Hkv, S, hd): at slots 0..S-1 (prefill, slots None), or one
        per sample (S = 1) at slots (B_g,) (absolute, visual slots included)."""
        if slots is None:
            S = k.shape[2]
            self.k[:, :, :S], self.v[:, :, :S] = k, v
            return
        assert k.shape[2] == 1 and slots.shape == (k.shape[0],), (
            f"decode: one token per sample, slots (B_g,) = ({k.shape[0]},), got {tuple(slots.shape)}")
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, slots] = k[:, :, 0].to(self.k.dtype)
        self.v[rows, :, slots] = v[:, :, 0].to(self.v.dtype)

    def visual_bytes(self) -> int:
        """Bytes of visual K/V held: the self layer's visual slots, or the cross sublayer's K/V."""
        if self.kind == "self":
            return 2 * self.k.shape[0] * self.k.shape[1] * self.n_visual * self.k.shape[3] * self.k.element_size()
        if self.kind == "cross":
            return (self.cross_k.numel() + self.cross_v.numel()) * self.cross_k.element_size()
        return 0

    def text_bytes(self) -> int:
        """Bytes allocated for text K/V (the whole capacity, used or not)."""
        return 2 * self.k.shape[0] * self.k.shape[1] * (self.k.shape[2] - self.n_visual) * self.k.shape[3] \
            * self.k.element_size()


@dataclass
class KVCache:
    """layers[i]: layer i's row groups (one group for every sample, or a self and a skip group),
    appended layer by layer at prefill. text_start (B,) int64: RoPE position of text slot 0 per
    sample (None until `VisorLVLM.hidden_states` prefills it from the images); lengths (B,) int64: text tokens cached per sample so far; capacity: text slots
    allocated per sample; visual_lens (B,) int64 or None: valid visual tokens per sample when the
    visual slots are padded after them (AnyRes images of different token counts), set at prefill;
    image_at: text slots before the image (the chat template's; see src/models/decoder.py), set at
    prefill."""

    text_start: Optional[torch.Tensor]
    lengths: torch.Tensor
    capacity: int
    layers: List[List[RowCache]] = field(default_factory=list)
    visual_lens: Optional[torch.Tensor] = None
    image_at: int = 0

    def visual_bytes(self) -> int:
        """Bytes of visual K/V held in the cache (all samples, all layers)."""
        return sum(g.visual_bytes() for groups in self.layers for g in groups)

    def text_bytes(self) -> int:
        return sum(g.text_bytes() for groups in self.layers for g in groups)

    def select(self, keep: torch.Tensor) -> "KVCache":
        """The cache of the samples `keep` (K,) int64, ascending batch indices, in that order (sample
        keep[j] becomes j): generation drops finished samples so they cost no more decode steps. A
        row group left without samples is dropped; one left with every sample covers all rows."""
        B = self.lengths.shape[0]
        assert keep.dim() == 1 and keep.numel() >= 1, f"keep must be (K,) with K >= 1, got {tuple(keep.shape)}"
        keep = keep.to(self.lengths.device)
        new_index = torch.full((B,), -1, dtype=torch.long, device=keep.device)
        new_index[keep] = torch.arange(keep.numel(), device=keep.device)
        K = keep.numel()

        def pick(t, idx):
            return None if t is None else t.index_select(0, idx)

        layers = []
        for groups in self.layers:
            kept = []
            for g in groups:
                if g.rows is None:
                    local, rows = keep, None
                else:
                    mine = new_index[g.rows] >= 0  # (B_g,) which of the group's samples stay
                    local, rows = mine.nonzero().squeeze(1), new_index[g.rows][mine]
                    if rows.numel() == 0:
                        continue
                    if rows.numel() == K:  # the group now covers every sample (in order: rows ascend)
                        rows = None
                kept.append(RowCache(g.kind, rows, pick(g.k, local), pick(g.v, local), g.n_visual,
                                     pick(g.cross_k, local), pick(g.cross_v, local)))
            layers.append(kept)
        return KVCache(pick(self.text_start, keep), pick(self.lengths, keep), self.capacity, layers,
                       pick(self.visual_lens, keep), self.image_at)

    def repeat(self, n: int) -> "KVCache":
        """The cache of a batch of n copies of every sample (for decode benchmarks at a batch larger
        than a prefill can afford); row groups keep their order (group rows r -> r*n..r*n+n-1)."""
        def rep(t):
            return None if t is None else t.repeat_interleave(n, dim=0)

        layers = [[RowCache(g.kind, None if g.rows is None else
                            (g.rows[:, None] * n + torch.arange(n, device=g.rows.device)).flatten(),
                            rep(g.k), rep(g.v), g.n_visual, rep(g.cross_k), rep(g.cross_v)) for g in groups]
                  for groups in self.layers]
        return KVCache(rep(self.text_start), rep(self.lengths), self.capacity, layers, rep(self.visual_lens),
                       self.image_at)
