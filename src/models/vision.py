"""Vision encoder: any timm model by name, returning patch tokens from one feature layer."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import timm
import torch
from torch import nn


class VisionEncoder(nn.Module):
    """Wraps `timm.create_model(name, features_only=True, out_indices=(feature_layer,))`.

    Works for CNNs and ViTs alike (timm returns NCHW maps for both, without CLS/prefix
    tokens). Input images are in [0, 1]; the encoder normalises with its own mean/std.
    Random init by default; `checkpoint_path` loads local weights (no hub download).
    `pos_embed` ("learned": trained from a truncated-normal init at std 0.02, "sincos": fixed 2-D
    sine-cosine, or None) adds an absolute position embedding to the output tokens, as a ViT
    (SigLIP, CLIP) has: a CNN's tokens otherwise say *what* is at a place but not *where*.
    `feature_norm` layer-normalises the features before the embedding is added, so that the two
    have comparable scales (measured on the shipped base: raw lcnet features have norm 22.7, its
    learned embedding 0.69). Tried as the base recipe with `sincos` (see the foundation issue
    notes), it did not help: validation loss stayed at 0.70 through step 2500, where the shipped
    recipe (`learned`, no norm) had reached 0.57.

    images (B, 3, H, W) -> tokens (B, V, C) with V = h * w of the feature map.
    """

    def __init__(
        self,
        name: str = "resnet10t",
        feature_layer: int = 2,
        image_size: int = 128,
        checkpoint_path: Optional[str] = None,
        mean: Optional[Tuple[float, float, float]] = None,
        std: Optional[Tuple[float, float, float]] = None,
        pos_embed: Optional[str] = None,
        feature_norm: bool = False,
    ) -> None:
        super().__init__()
        if name not in timm.list_models():
            raise ValueError(f"vision.name: {name!r} is not a timm model")
        if image_size < 8:
            raise ValueError(f"vision.image_size must be >= 8, got {image_size}")
        kwargs = {}
        if checkpoint_path is not None:
            kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint_path))
        try:
            self.backbone = timm.create_model(name, features_only=True, out_indices=(feature_layer,), **kwargs)
        except (IndexError, AssertionError, ValueError) as e:
            raise ValueError(f"vision.feature_layer={feature_layer} is not valid for {name!r}: {e}") from e
        self.name, self.feature_layer, self.image_size = name, feature_layer, image_size
        # Normalisation: given, else the pretrained weights' own (timm's pretrained_cfg), else 0.5/0.5.
        cfg = (getattr(self.backbone, "pretrained_cfg", None) or {}) if checkpoint_path is not None else {}
        mean = tuple(mean if mean is not None else cfg.get("mean", (0.5,) * 3))
        std = tuple(std if std is not None else cfg.get("std", (0.5,) * 3))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.out_dim = self.backbone.feature_info.channels()[-1]
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            fmap = self.backbone(torch.zeros(1, 3, image_size, image_size))[-1]
            self.backbone.train(was_training)
        self.grid: Tuple[int, int] = (fmap.shape[2], fmap.shape[3])
        if pos_embed not in (None, "sincos", "learned"):
            raise ValueError(f"vision.pos_embed must be 'sincos', 'learned' or null, got {pos_embed!r}")
        self.pos_embed_kind = pos_embed
        self.feature_norm = nn.LayerNorm(self.out_dim) if feature_norm else None
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, self.out_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_2d(self.grid, self.out_dim).unsqueeze(0), persistent=False)
        else:
            self.pos_embed = None

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dim() == 4 and images.shape[1] == 3, f"images must be (B, 3, H, W), got {tuple(images.shape)}"
        assert images.shape[-2:] == (self.image_size, self.image_size), (
            f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        fmap = self.backbone((images - self.mean) / self.std)[-1]  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, V, C)
        if self.feature_norm is not None:
            tokens = self.feature_norm(tokens)
        return tokens if self.pos_embed is None else tokens + self.pos_embed


def sincos_2d(grid: Tuple[int, int], dim: int, temperature: float = 100.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (as MAE, He et al. 2021) -> (h * w, dim), raster
    order. Half the channels encode the row, half the column; each half is sin/cos pairs over
    frequencies from 1 down to 1/temperature (100, not the usual 10000: a token grid is tens of
    positions wide, and slower frequencies would be nearly constant over it). Any channels left
    over when dim is not a multiple of 4 are zero. Each entry is in [-1, 1], so the per-token norm
    is about sqrt(dim / 2), the scale of layer-normalised features (sqrt(dim))."""
    h, w = grid
    n_freq = dim // 4
    if n_freq == 0:
        raise ValueError(f"a 2-D sine-cosine embedding needs at least 4 channels, got {dim}")
    freqs = temperature ** (-torch.arange(n_freq, dtype=torch.float64) / max(n_freq - 1, 1))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None] * freqs[None, :]  # (h * w, n_freq)
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    emb = torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
    assert emb.shape == (h * w, dim) and math.isfinite(emb.abs().max().item())
    return emb.float()
