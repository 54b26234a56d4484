"""LLaVA-OneVision's AnyRes (`anyres_max_9`): one image as a base crop plus a grid of tiles.

Geometry and order follow LLaVA-NeXT / LLaVA-OneVision (Li et al. 2024, "LLaVA-OneVision: Easy
Visual Task Transfer", sec. 3; transformers' `LlavaOnevisionImageProcessor` and
`LlavaOnevisionModel.pack_image_features`), written here from those descriptions:

1. The tile grid: of the grid pinpoints (canvas sizes (h, w), multiples of the tile side S), the one
   where the image, scaled to fit, keeps the most of its pixels, then wastes the fewest.
2. Pixels: the image resized (aspect kept) into that canvas, centred on zero padding, cut into
   S x S tiles, row-major; before them the whole image resized to S x S (the base crop).
3. Tokens: the base crop's g x g features (g = S // patch), then the tiles' features stitched into
   one (rows*g, cols*g) map, the padding rows or columns cut off (unpadding to the image's aspect),
   bilinearly downsampled when it holds more than 1.1 x `max_tiles` tiles' worth, and one
   `image_newline` after each of its rows.

Images enter the model as `TiledImages`: zero-padded crops (B, N, 3, S, S) in [0, 1] and each
image's original (height, width); `AnyRes.pack` turns one image's crop features into its tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Crop-count threshold above which the stitched feature map is downsampled (LLaVA-OneVision's 1.1).
_DOWNSAMPLE_ABOVE = 1.1


def default_pinpoints(tile: int, max_side: int = 6) -> List[List[int]]:
    """LLaVA-OneVision's grid pinpoints: every (i*tile, j*tile) canvas, 1 <= i, j <= max_side."""
    return [[i * tile, j * tile] for i in range(1, max_side + 1) for j in range(1, max_side + 1)]


@dataclass
class AnyRes:
    """AnyRes settings. tile: the crop side S (the vision tower's input size); patch: the tower's patch
    size (g = tile // patch features per side); max_tiles: the N of `anyres_max_N` (9 for
    LLaVA-OneVision); pinpoints: canvas sizes [[h, w], ...], multiples of tile (default: LLaVA-OV's
    1..6 x 1..6 tiles)."""

    tile: int = 384
    patch: int = 14
    max_tiles: int = 9
    pinpoints: Optional[List[List[int]]] = field(default=None)

    def __post_init__(self) -> None:
        if self.tile < 1 or self.patch < 1 or self.patch > self.tile:
            raise ValueError(f"anyres.tile={self.tile} and anyres.patch={self.patch} must be positive, patch <= tile")
        if self.max_tiles < 1:
            raise ValueError(f"anyres.max_tiles must be >= 1, got {self.max_tiles}")
        if self.pinpoints is None:
            self.pinpoints = default_pinpoints(self.tile)
        self.pinpoints = [list(map(int, p)) for p in self.pinpoints]
        for p in self.pinpoints:
            if len(p) != 2 or p[0] < self.tile or p[1] < self.tile or p[0] % self.tile or p[1] % self.tile:
                raise ValueError(f"anyres.pinpoints entry {p}: each must be [h, w], positive multiples of "
                                 f"anyres.tile={self.tile}")
        if not self.pinpoints:
            raise ValueError("anyres.pinpoints is empty")

    @property
    def grid(self) -> int:
        """Features per crop side (g)."""
        return self.tile // self.patch

    # --- geometry -------------------------------------------------------------------------------

    def canvas(self, height: int, width: int) -> Tuple[int, int]:
        """The pinpoint (h, w) an image of (height, width) is resized into: the most effective pixels,
        then the least waste (ties keep the first listed)."""
        best, best_key = None, None
        for h, w in self.pinpoints:
            scale = min(w / width, h / height)
            effective = min(int(width * scale) * int(height * scale), width * height)
            key = (effective, -(w * h - effective))
            if best_key is None or key > best_key:
                best, best_key = (h, w), key
        return best

    def tile_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(rows, cols) of tiles for an image of (height, width)."""
        h, w = self.canvas(height, width)
        return h // self.tile, w // self.tile

    def n_crops(self, height: int, width: int) -> int:
        rows, cols = self.tile_grid(height, width)
        return 1 + rows * cols

    def tile_feature_shape(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) of the stitched tile feature map after unpadding and any downsampling (before newlines)."""
        rows, cols = self.tile_grid(height, width)
        cur_h, cur_w = rows * self.grid, cols * self.grid
        top, left = _unpad_offsets(cur_h, cur_w, height, width)
        cur_h, cur_w = cur_h - 2 * top, cur_w - 2 * left
        ratio = self._downsample_ratio(cur_h, cur_w)
        if ratio is not None:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
        return cur_h, cur_w

    def num_tokens(self, height: int, width: int) -> int:
        """Visual tokens entering the LLM for one image: base g*g + h * (w + 1) (a newline per row)."""
        h, w = self.tile_feature_shape(height, width)
        return self.grid ** 2 + h * (w + 1)

    def _downsample_ratio(self, h: int, w: int) -> Optional[float]:
        ratio = math.sqrt(h * w / (self.max_tiles * self.grid ** 2))
        return ratio if ratio > _DOWNSAMPLE_ABOVE else None

    # --- pixels ---------------------------------------------------------------------------------

    def crops(self, image: torch.Tensor) -> torch.Tensor:
        """image (3, H, W) uint8 -> crops (1 + rows*cols, 3, S, S) float in [0, 1]: the base crop, then
        the tiles row-major. Bicubic, antialiased resizing on the uint8 image, as LLaVA-OV's processor."""
        from torchvision.transforms.v2 import functional as tvF  # timm's dependency; kept out of model import

        if not (image.dim() == 3 and image.shape[0] == 3 and image.dtype == torch.uint8):
            raise ValueError(f"AnyRes.crops takes one (3, H, W) uint8 image, got {tuple(image.shape)} {image.dtype}")
        H, W = image.shape[1:]
        ch, cw = self.canvas(H, W)
        new_h, new_w = _fit_size(H, W, ch, cw)
        bicubic = tvF.InterpolationMode.BICUBIC
        resized = tvF.resize(image, [new_h, new_w], interpolation=bicubic, antialias=True)
        left, top = (cw - new_w) // 2, (ch - new_h) // 2
        canvas = tvF.pad(resized, [left, top, cw - new_w - left, ch - new_h - top], fill=0)
        S = self.tile
        tiles = canvas.unflatten(1, (ch // S, S)).unflatten(3, (cw // S, S))  # (3, rows, S, cols, S)
        tiles = tiles.permute(1, 3, 0, 2, 4).reshape(-1, 3, S, S)
        base = tvF.resize(image, [S, S], interpolation=bicubic, antialias=True)
        return torch.cat([base[None], tiles]).float() / 255.0

    # --- tokens ---------------------------------------------------------------------------------

    def pack(self, features: torch.Tensor, height: int, width: int, newline: Optional[torch.Tensor]) -> torch.Tensor:
        """One image's crop features (1 + rows*cols, g*g, d) -> its tokens (num_tokens(height, width), d):
        the base crop's, then the unpadded (and maybe downsampled) tile map row by row, each row
        followed by `newline` (d,) (None: no newline tokens, as a model without one)."""
        rows, cols = self.tile_grid(height, width)
        g = self.grid
        assert features.dim() == 3 and features.shape[:2] == (1 + rows * cols, g * g), (
            f"features must be (1 + {rows}*{cols}, {g * g}, d) for a {height}x{width} image, got {tuple(features.shape)}")
        d = features.shape[-1]
        tiles = features[1:].view(rows, cols, g, g, d).permute(4, 0, 2, 1, 3).reshape(d, rows * g, cols * g)
        top, left = _unpad_offsets(rows * g, cols * g, height, width)
        tiles = tiles[:, top: rows * g - top, left: cols * g - left]
        ratio = self._downsample_ratio(tiles.shape[1], tiles.shape[2])
        if ratio is not None:
            size = [int(tiles.shape[1] // ratio), int(tiles.shape[2] // ratio)]
            tiles = F.interpolate(tiles[None], size, mode="bilinear")[0]
        if newline is not None:
            tiles = torch.cat([tiles, newline.to(tiles.dtype)[:, None, None].expand(d, tiles.shape[1], 1)], dim=2)
        return torch.cat([features[0], tiles.flatten(1).transpose(0, 1)])


@dataclass
class TiledImages:
    """A batch of AnyRes images: crops (B, N, 3, S, S) float in [0, 1] (each image's 1 + rows*cols crops
    first, zero crops after), sizes (B, 2) int64: each image's original (height, width)."""

    crops: torch.Tensor
    sizes: torch.Tensor

    def __post_init__(self) -> None:
        assert self.crops.dim() == 5 and self.crops.shape[2] == 3, (
            f"TiledImages.crops must be (B, N, 3, S, S), got {tuple(self.crops.shape)}")
        assert self.sizes.shape == (self.crops.shape[0], 2), (
            f"TiledImages.sizes must be (B, 2) = ({self.crops.shape[0]}, 2), got {tuple(self.sizes.shape)}")

    @property
    def shape(self) -> torch.Size:  # batch size first, as an image tensor's
        return self.crops.shape

    def to(self, *args, **kwargs) -> "TiledImages":
        crops = self.crops.to(*args, **kwargs)
        return TiledImages(crops, self.sizes.to(crops.device))

    @staticmethod
    def stack(crops: Sequence[torch.Tensor], sizes: Sequence[Tuple[int, int]]) -> "TiledImages":
        """Per-image crops [(N_b, 3, S, S)] and sizes [(H, W)] -> one zero-padded batch."""
        n = max(c.shape[0] for c in crops)
        padded = torch.stack([F.pad(c, (0, 0, 0, 0, 0, 0, 0, n - c.shape[0])) for c in crops])
        return TiledImages(padded, torch.tensor([list(s) for s in sizes], dtype=torch.long))


def _fit_size(height: int, width: int, canvas_h: int, canvas_w: int) -> Tuple[int, int]:
    """The image's size resized to fit the canvas, aspect kept (the fitting side exact, the other rounded up)."""
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def _unpad_offsets(cur_h: int, cur_w: int, height: int, width: int) -> Tuple[int, int]:
    """(rows, cols) of padding to cut from each side of a (cur_h, cur_w) map holding a (height, width)
    image centred with padding."""
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        return (cur_h - new_h) // 2, 0
    new_w = int(round(width * (cur_h / height), 7))
    return 0, (cur_w - new_w) // 2
