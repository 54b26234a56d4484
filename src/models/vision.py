"""Vision encoder: any timm model by name, returning patch tokens from one feature layer."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Tuple

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from src.models.state_check import state_differences


class VisionEncoder(nn.Module):
    """Wraps `timm.create_model(name, features_only=True, out_indices=(feature_layer,))`.

    Works for CNNs and ViTs alike (timm returns NCHW maps for both, without CLS/prefix
    tokens). Input images are in [0, 1]; the encoder normalises with its own mean/std.
    Random init by default; `checkpoint_path` loads local timm weights into the backbone (no hub
    download); `weights_path` loads a whole state of this encoder as the project's own encoder
    pretraining exports it (configs/encoder.yaml: the stand-in for a CLIP/SigLIP encoder).
    `pos_embed` ("learned": trained from a truncated-normal init at std 0.02, "sincos": fixed 2-D
    sine-cosine, or None) adds an absolute position embedding to the output tokens, as a ViT
    (SigLIP, CLIP) has: a CNN's tokens otherwise say *what* is at a place but not *where*.
    `feature_norm` layer-normalises the features before the embedding is added, so that the two
    have comparable scales (measured on the first base: raw lcnet features had norm 22.7, its
    learned embedding 0.69, and its visual tokens did not say where they were: `spatial` stayed at
    chance). The shipped base uses `sincos` + `feature_norm` on an encoder pretrained on dense
    targets (configs/encoder.yaml); trained from scratch jointly with the LLM, the same pair had
    not learned (foundation issue notes).

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
        weights_path: Optional[str] = None,
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
        self.weights_path = weights_path
        if weights_path is not None:
            self.load_weights(weights_path)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What each token shows, before the position embedding: images (B, 3, H, W) -> (B, V, C).
        The encoder pretraining (src/lit/encoder_pretrain.py) supervises these."""
        assert images.dim() == 4 and images.shape[1] == 3, f"images must be (B, 3, H, W), got {tuple(images.shape)}"
        assert images.shape[-2:] == (self.image_size, self.image_size), (
            f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        fmap = self.backbone((images - self.mean) / self.std)[-1]  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, V, C)
        return tokens if self.feature_norm is None else self.feature_norm(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.features(images)
        return tokens if self.pos_embed is None else tokens + self.pos_embed

    def load_weights(self, path: str | Path) -> None:
        """Load a state dict of this encoder (safetensors, as the encoder pretraining exports it);
        every tensor must match by name and shape, else an error lists the differences and nothing
        is loaded."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"vision.weights_path={path} does not exist (run the encoder pretraining: "
                                    "python -m src.cli fit --config configs/encoder.yaml)")
        state = load_file(str(path))
        missing, unexpected, misshaped = state_differences(self.state_dict(), state)
        if missing or unexpected or misshaped:
            raise ValueError(f"vision.weights_path={path} does not fit this encoder ({self.name}, feature_layer "
                             f"{self.feature_layer}, feature_norm {self.feature_norm is not None}, pos_embed "
                             f"{self.pos_embed_kind}): missing {missing}, unexpected {unexpected}, "
                             f"mis-shaped {misshaped}")
        self.load_state_dict(state)


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
