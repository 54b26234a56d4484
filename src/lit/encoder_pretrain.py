"""Stage 0: pretrain the vision encoder on dense targets (the embedded default's CLIP/SigLIP).

    python -m src.cli fit --config configs/encoder.yaml

A linear head on each token's features (`VisionEncoder.features`, before the position embedding)
predicts the multi-hot map of src/data/dense_targets.py: which large / medium / small object, which
digit (and in which half of the cell) is centred in that token. Binary cross-entropy per channel.
Validation reports per-group precision / recall / F1 at probability 0.5 and `count_acc`: the share
of (image, small kind) pairs where the number of tokens predicted for that kind equals the number
of objects drawn, i.e. how well counting could be read off the tokens.

At the end of fit the encoder (not the head) is written to `export_dir/model.safetensors` with a
manifest (recipe, commit, steps, validation); `vision.weights_path` in configs/base.yaml loads it.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Dict, Optional

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from src.data.dense_targets import CHANNELS, GROUP_CHANNELS, GROUPS, dense_targets
from src.lit.checkpoint_io import fit_manifest, write_manifest
from src.lit.visor_module import warmup_cosine, weight_decays
from src.models.vision import VisionEncoder

log = logging.getLogger(__name__)

SMALL_KINDS = tuple(i for i, name in enumerate(CHANNELS) if name.startswith("small/"))


class EncoderPretrainModule(L.LightningModule):
    def __init__(self, vision: VisionEncoder, lr: float = 2e-3, warmup_steps: int = 200,
                 min_lr_ratio: float = 0.05, weight_decay: float = 0.05, pos_weight: float = 1.0,
                 export_dir: Optional[str] = None, config_path: Optional[str] = None) -> None:
        super().__init__()
        for name, value in dict(lr=lr, pos_weight=pos_weight).items():
            if not value > 0:
                raise ValueError(f"model.{name} must be > 0, got {value}")
        for name, value in dict(warmup_steps=warmup_steps, weight_decay=weight_decay).items():
            if value < 0:
                raise ValueError(f"model.{name} must be >= 0, got {value}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters(ignore=["vision"])
        self.vision = vision
        self.head = nn.Linear(vision.out_dim, len(CHANNELS))
        self._stats: Dict[str, torch.Tensor] = {}

    def targets(self, scenes) -> torch.Tensor:
        """-> (B, V, K) multi-hot on this encoder's grid, raster order as the tokens."""
        maps = [dense_targets(s, self.vision.grid, self.vision.image_size) for s in scenes]
        return torch.stack(maps).flatten(2).transpose(1, 2).to(self.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> logits (B, V, K)."""
        return self.head(self.vision.features(images))

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pos_weight = torch.full((logits.shape[-1],), self.hparams.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["images"])
        loss = self._loss(logits, self.targets(batch["scenes"]))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._stats = {k: torch.zeros(len(GROUPS)) for k in ("tp", "fp", "fn")}
        self._stats.update(count_hit=torch.zeros(()), count_n=torch.zeros(()), loss=torch.zeros(()), batches=torch.zeros(()))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["images"])
        target = self.targets(batch["scenes"])
        pred = (logits > 0).float()
        s = self._stats
        s["loss"] += self._loss(logits, target).item()
        s["batches"] += 1
        for g, idx in enumerate(GROUP_CHANNELS.values()):
            p, t = pred[..., idx], target[..., idx]
            s["tp"][g] += (p * t).sum().item()
            s["fp"][g] += (p * (1 - t)).sum().item()
            s["fn"][g] += ((1 - p) * t).sum().item()
        kinds = list(SMALL_KINDS)
        s["count_hit"] += (pred[..., kinds].sum(1) == target[..., kinds].sum(1)).sum().item()
        s["count_n"] += len(batch["scenes"]) * len(kinds)

    def on_validation_epoch_end(self) -> None:
        s = self._stats
        if not s or s["batches"] == 0:
            return
        self.log("val/loss", s["loss"] / s["batches"])
        for g, group in enumerate(GROUPS):
            tp, fp, fn = s["tp"][g], s["fp"][g], s["fn"][g]
            precision, recall = tp / (tp + fp).clamp(min=1), tp / (tp + fn).clamp(min=1)
            self.log(f"val/precision/{group}", precision)
            self.log(f"val/recall/{group}", recall)
            self.log(f"val/f1/{group}", 2 * precision * recall / (precision + recall).clamp(min=1e-8))
        self.log("val/count_acc", s["count_hit"] / s["count_n"], prog_bar=True)

    def configure_optimizers(self):
        h = self.hparams
        decay = [p for n, p in self.named_parameters() if weight_decays(n, p)]
        other = [p for n, p in self.named_parameters() if not weight_decays(n, p)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay},
                                 {"params": other, "weight_decay": 0.0}], lr=h.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
            warmup_cosine, start=0, warmup=h.warmup_steps, total=total, min_ratio=h.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        out = Path(self.hparams.export_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.vision.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        v = self.vision
        write_manifest(out, {
            "vision": {"name": v.name, "feature_layer": v.feature_layer, "image_size": v.image_size,
                       "pos_embed": v.pos_embed_kind, "feature_norm": v.feature_norm is not None},
            **fit_manifest(self.trainer, self.hparams.config_path),
            "channels": list(CHANNELS),
        })
        log.info("exported the pretrained vision encoder to %s", out)
