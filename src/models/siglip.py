"""A SigLIP-style ViT vision encoder with explicit dimensions (timm `VisionTransformer`).

`VisionEncoder` (src/models/vision.py) builds a timm model by registered name only, so it cannot
express a ViT of given width/depth/MLP size, the tanh-approximated GELU SigLIP uses, or a tower
cut after a chosen layer (LLaVA-OneVision reads SigLIP-so400m's 26th of 27 layers). This class
builds timm's generic VisionTransformer with exactly those settings and keeps the encoder
interface VisorLVLM relies on: `out_dim`, `grid`, `num_tokens`, `image_size`, `name`,
`feature_layer`, images in [0, 1] normalised inside forward.

images (B, 3, S, S) in [0, 1] -> tokens (B, V, C), V = (S // patch_size) ** 2, raster order, taken
after block `depth` (HF hidden_states[depth]: before the tower's post-layernorm), no CLS token.
"""
from __future__ import annotations

from functools import partial
from typing import Tuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class SiglipVisionEncoder(nn.Module):
    """SigLIP vision tower without head and post-layernorm, cut after `depth` blocks.

    image_size, patch_size: square input and patches (a patch conv with stride patch_size; a
    remainder, as 384 / 14, is dropped like SigLIP's 'valid' conv); width, depth, n_heads, mlp_dim:
    the transformer; norm_eps: LayerNorm eps; act: timm activation name (SigLIP: gelu_tanh);
    mean, std: per-channel normalisation applied to [0, 1] images (SigLIP: 0.5, 0.5)."""

    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 14,
        width: int = 1152,
        depth: int = 26,
        n_heads: int = 16,
        mlp_dim: int = 4304,
        norm_eps: float = 1e-6,
        act: str = "gelu_tanh",
        mean: Tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: Tuple[float, float, float] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        for key, value in dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
                               n_heads=n_heads, mlp_dim=mlp_dim).items():
            if int(value) < 1:
                raise ValueError(f"vision.{key} must be a positive integer, got {value}")
        if patch_size > image_size:
            raise ValueError(f"vision.patch_size={patch_size} exceeds vision.image_size={image_size}")
        if width % n_heads:
            raise ValueError(f"vision.width={width} is not divisible by vision.n_heads={n_heads}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"vision.mean and vision.std must be 3 values (std > 0), got {mean}, {std}")
        self.vit = VisionTransformer(
            img_size=image_size, patch_size=patch_size, num_classes=0, global_pool="", embed_dim=width, depth=depth,
            num_heads=n_heads, mlp_ratio=mlp_dim / width, qkv_bias=True, class_token=False, final_norm=False,
            act_layer=act, norm_layer=partial(nn.LayerNorm, eps=norm_eps),
        )
        got = self.vit.blocks[0].mlp.fc1.out_features
        if got != mlp_dim:  # timm sizes the MLP as int(width * mlp_ratio)
            raise ValueError(f"vision.mlp_dim={mlp_dim} cannot be built by timm (got {got} from mlp_ratio)")
        self.name, self.image_size, self.patch_size = "siglip", image_size, patch_size
        self.feature_layer, self.out_dim = depth, width
        side = image_size // patch_size
        self.grid: Tuple[int, int] = (side, side)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [0, 1] -> tokens (B, V, C)."""
        if images.dim() == 5:
            raise ValueError(f"images {tuple(images.shape)}: several crops per image go in as "
                             "src.models.anyres.TiledImages (to a model built with anyres), not a 5-D tensor")
        assert images.dim() == 4 and images.shape[1] == 3, f"images must be (B, 3, H, W), got {tuple(images.shape)}"
        assert images.shape[-2:] == (self.image_size, self.image_size), (
            f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        tokens = self.vit.forward_features(x)  # (B, V, C): no prefix tokens, no final norm
        assert tokens.shape[1:] == (self.num_tokens, self.out_dim)
        return tokens
