"""Vision encoder: any timm model by name, returning patch tokens from one feature layer."""
from __future__ import annotations

from typing import Optional, Tuple

import timm
import torch
from torch import nn


class VisionEncoder(nn.Module):
    """Wraps `timm.create_model(name, features_only=True, out_indices=(feature_layer,))`.

    Works for CNNs and ViTs alike (timm returns NCHW maps for both, without CLS/prefix
    tokens). Input images are in [0, 1]; the encoder normalises with its own mean/std.
    Random init by default; `checkpoint_path` loads local weights (no hub download).
    `pos_embed` adds a learned absolute position embedding to the output tokens, as a ViT
    (SigLIP, CLIP) has: a CNN's tokens otherwise say *what* is at a place but not *where*, and
    text reading them through attention learns nothing about position (spatial relations,
    the order of digits).

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
        pos_embed: bool = False,
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
        self.pos_embed = None
        if pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, self.out_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dim() == 4 and images.shape[1] == 3, f"images must be (B, 3, H, W), got {tuple(images.shape)}"
        assert images.shape[-2:] == (self.image_size, self.image_size), (
            f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        fmap = self.backbone((images - self.mean) / self.std)[-1]  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, V, C)
        return tokens if self.pos_embed is None else tokens + self.pos_embed
