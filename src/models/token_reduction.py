"""Token-reduction baselines: fewer visual tokens in the LLM (usable alone and stacked with VISOR).

Before the LLM (`forward(visual, grid) -> (visual', positions)`):
  pool       s x s average pooling of the token grid; pooled tokens are new tokens on a smaller
             grid, so they take positions 0..V'-1 and the text follows them (positions None).
  visionzip  dominant tokens + a few contextual tokens merged from the rest (VisionZip,
             Yang et al. 2024, arXiv 2412.04467); kept tokens keep their original positions.
  random     a seeded random subset, the same for every image (the sanity floor).
Inside the LLM:
  fastv      at layer K, drop the visual tokens that the last prompt token attended to least at
             layer K-1 (FastV, Chen et al. 2024, arXiv 2403.06764). The decoder runs it
             (`in_llm = True`): it needs that layer's attention.

Selection reducers return positions (B, V') int64: each kept token's index in the original
(B, V0) token sequence, ascending, so RoPE sees the original layout and the text keeps the
positions it had without reduction (V0..).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F


def _keep_count(V: int, keep_ratio: float, field: str) -> int:
    n = int(round(V * keep_ratio))
    if not 1 <= n <= V:
        raise ValueError(f"{field}={keep_ratio} keeps {n} of {V} visual tokens; it must keep at least one")
    return n


def _check_ratio(value: float, field: str) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{field} must be in (0, 1], got {value}")


class TokenReducer(nn.Module):
    """Base class: visual tokens (B, V, d) on an (h, w) grid -> (B, V', d) and positions.

    `output_grid` is the grid entering the LLM for pooling, and the original grid (with
    `n_tokens` kept) for selection reducers, whose tokens keep their original positions."""

    in_llm = False

    def n_tokens(self, V: int) -> int:
        """Visual tokens entering the LLM when V0 = V come out of the encoder."""
        raise NotImplementedError

    def output_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        """The grid whose raster order the visual positions index (the input grid unless pooled)."""
        return grid

    def reduction_flops(self, V: int, d: int) -> int:
        """Matmul FLOPs of the reduction itself for one sample (counted as FlopCounterMode does)."""
        return 0

    def forward(self, visual: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError


class AvgPoolReducer(TokenReducer):
    """s x s average pooling over the visual token grid (LLaVA-OV's 2x2 bilinear pooling's cousin)."""

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"token_reducer.size must be >= 1, got {size}")
        self.size = size

    def output_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        h, w = grid
        if h % self.size or w % self.size:
            raise ValueError(f"token_reducer.size={self.size} does not divide the visual grid {grid}")
        return h // self.size, w // self.size

    def n_tokens(self, V: int) -> int:
        return V // (self.size * self.size)

    def forward(self, visual: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, None]:
        B, V, d = visual.shape
        h, w = grid
        assert V == h * w, f"visual has {V} tokens, grid {grid} says {h * w}"
        x = visual.transpose(1, 2).reshape(B, d, h, w)
        x = F.avg_pool2d(x, self.size)  # (B, d, h/s, w/s)
        return x.flatten(2).transpose(1, 2), None  # (B, V/s^2, d)


def _gather_tokens(visual: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """visual (B, V, d), index (B, K) -> (B, K, d)."""
    return visual.gather(1, index.unsqueeze(-1).expand(-1, -1, visual.shape[-1]))


class RandomReducer(TokenReducer):
    """Keeps a seeded random subset of `keep_ratio` of the tokens, the same subset for every image."""

    def __init__(self, keep_ratio: float = 0.25, seed: int = 0) -> None:
        super().__init__()
        _check_ratio(keep_ratio, "token_reducer.keep_ratio")
        self.keep_ratio, self.seed = keep_ratio, seed

    def n_tokens(self, V: int) -> int:
        return _keep_count(V, self.keep_ratio, "token_reducer.keep_ratio")

    def subset(self, V: int) -> torch.Tensor:
        """(n_tokens(V),) int64, ascending: the kept indices."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(V, generator=g)[: self.n_tokens(V)].sort().values

    def forward(self, visual: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        B, V, _ = visual.shape
        assert V == grid[0] * grid[1], f"visual has {V} tokens, grid {grid} says {grid[0] * grid[1]}"
        keep = self.subset(V).to(visual.device).expand(B, -1)  # (B, K)
        return _gather_tokens(visual, keep), keep


class VisionZipReducer(TokenReducer):
    """VisionZip-style: keep the dominant tokens, merge the rest into a few contextual tokens.

    Dominance: VisionZip ranks by the [CLS] attention of the vision encoder; an encoder without
    a CLS token (a CNN, SigLIP) has none, so tokens are ranked by the L2 norm of their features
    as they enter the LLM, the issue's stated fallback. Of the `keep_ratio * V` kept tokens,
    `contextual_fraction` are contextual (VisionZip keeps 54 dominant + 10 contextual of 64):
    targets spread evenly over the remaining tokens (in raster order), every remaining token is
    averaged into its most cosine-similar target, and a contextual token takes its target's
    original position.
    """

    def __init__(self, keep_ratio: float = 0.25, contextual_fraction: float = 0.15) -> None:
        super().__init__()
        _check_ratio(keep_ratio, "token_reducer.keep_ratio")
        if not 0.0 <= contextual_fraction < 1.0:
            raise ValueError(f"token_reducer.contextual_fraction must be in [0, 1), got {contextual_fraction}")
        self.keep_ratio, self.contextual_fraction = keep_ratio, contextual_fraction

    def n_tokens(self, V: int) -> int:
        return _keep_count(V, self.keep_ratio, "token_reducer.keep_ratio")

    def split(self, V: int) -> Tuple[int, int]:
        """-> (dominant, contextual) token counts for V input tokens."""
        n = self.n_tokens(V)
        n_ctx = min(int(round(n * self.contextual_fraction)), V - n)
        return n - n_ctx, n_ctx

    def reduction_flops(self, V: int, d: int) -> int:
        n_dom, n_ctx = self.split(V)
        return 2 * (V - n_dom) * n_ctx * d  # similarity of the remaining tokens to the targets

    def forward(self, visual: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        B, V, d = visual.shape
        assert V == grid[0] * grid[1], f"visual has {V} tokens, grid {grid} says {grid[0] * grid[1]}"
        n_dom, n_ctx = self.split(V)
        order = visual.detach().float().norm(dim=-1).argsort(dim=1, descending=True)  # (B, V)
        dominant = order[:, :n_dom].sort(dim=1).values  # (B, n_dom)
        if n_ctx == 0:
            return _gather_tokens(visual, dominant), dominant
        rest = order[:, n_dom:].sort(dim=1).values  # (B, R) remaining, raster order
        R = rest.shape[1]
        pick = torch.linspace(0, R - 1, n_ctx, device=visual.device).round().long()  # evenly spread
        targets = rest[:, pick]  # (B, n_ctx)
        x_rest = _gather_tokens(visual, rest)  # (B, R, d)
        unit = F.normalize(x_rest, dim=-1)
        sim = unit @ F.normalize(_gather_tokens(visual, targets), dim=-1).transpose(1, 2)  # (B, R, n_ctx)
        assign = sim.argmax(dim=-1)  # (B, R); each target is most similar to itself
        sums = visual.new_zeros(B, n_ctx, d).scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, d), x_rest)  # (B, n_ctx, d)
        counts = torch.zeros(B, n_ctx, device=visual.device, dtype=visual.dtype).scatter_add(
            1, assign, torch.ones_like(assign, dtype=visual.dtype))
        contextual = sums / counts.clamp_min(1).unsqueeze(-1)
        index = torch.cat([dominant, targets], dim=1)  # (B, n)
        tokens = torch.cat([_gather_tokens(visual, dominant), contextual], dim=1)
        index, perm = index.sort(dim=1)  # raster order of positions
        return _gather_tokens(tokens, perm), index


class FastVReducer(TokenReducer):
    """FastV-style: at LLM layer `layer` (K >= 1), drop `drop_ratio` of the visual tokens, those
    receiving the least attention (mean over heads) from the last prompt token at layer K-1.

    Runs inside the decoder (`in_llm`); layer K-1 must read the visual tokens (a `self` or
    `cross` layer, in every budget)."""

    in_llm = True

    def __init__(self, layer: int = 2, drop_ratio: float = 0.5) -> None:
        super().__init__()
        if layer < 1:
            raise ValueError(f"token_reducer.layer must be >= 1 (it ranks by layer K-1's attention), got {layer}")
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"token_reducer.drop_ratio must be in [0, 1), got {drop_ratio}")
        self.layer, self.drop_ratio = layer, drop_ratio

    def n_tokens(self, V: int) -> int:
        """Visual tokens entering the LLM (all: fastv drops inside it)."""
        return V

    def n_kept(self, V: int) -> int:
        """Visual tokens from layer K on."""
        return _keep_count(V, 1.0 - self.drop_ratio, "token_reducer.drop_ratio (kept 1 - drop_ratio)")

    def forward(self, visual, grid):
        raise RuntimeError("fastv reduces inside the decoder; VisorLVLM hands it to the Decoder")

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, V) attention received -> kept indices (B, n_kept(V)), ascending."""
        return scores.topk(self.n_kept(scores.shape[1]), dim=1).indices.sort(dim=1).values
