"""LightningModule: trains a VisorLVLM with a fixed layer plan (loss on answer tokens only)."""
from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F

from src.data.generator import TASKS
from src.flops import SampleFlops, sample_flops
from src.lit.checkpoint_io import load_base_checkpoint
from src.metrics import GroupedAccuracy, exact_match
from src.models.lvlm import VisorLVLM

log = logging.getLogger(__name__)


class VisorLitModule(L.LightningModule):
    """Universal entry point for base training, VISOR conversion and baselines.

    Args:
        lvlm: the model (class_path/init_args in YAML).
        base_checkpoint: a shipped base LVLM (safetensors) to convert; new VISOR parts keep their init.
        freeze_vision: keep the vision encoder frozen (and its norm statistics fixed).
        new_params_only_steps: for the first N steps train only the parameters the base lacks
            (cross sublayers, positional conv); then everything not frozen.
        lr, min_lr_ratio, warmup_steps, weight_decay, betas: AdamW with linear warmup, cosine decay.
        tasks: task names for per-task validation accuracy.
    """

    def __init__(
        self,
        lvlm: VisorLVLM,
        base_checkpoint: Optional[str] = None,
        freeze_vision: bool = False,
        new_params_only_steps: int = 0,
        lr: float = 2e-3,
        min_lr_ratio: float = 0.05,
        warmup_steps: int = 100,
        weight_decay: float = 0.05,
        betas: Tuple[float, float] = (0.9, 0.95),
        tasks: Sequence[str] = TASKS,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0 or new_params_only_steps < 0:
            raise ValueError("model.warmup_steps and model.new_params_only_steps must be >= 0")
        if new_params_only_steps and base_checkpoint is None:
            raise ValueError("model.new_params_only_steps needs model.base_checkpoint (new relative to what?)")
        self.save_hyperparameters(ignore=["lvlm"])
        self.lvlm = lvlm
        self.new_params: List[str] = []
        if base_checkpoint is not None:
            if not Path(base_checkpoint).exists():
                raise FileNotFoundError(
                    f"model.base_checkpoint={base_checkpoint} does not exist: train a base with configs/base.yaml and "
                    "export it with `python -m src.export --config configs/base.yaml --ckpt <last.ckpt> --out <dir>`")
            report = load_base_checkpoint(lvlm, base_checkpoint)
            self.new_params = ["lvlm." + n for n in report["new"]]
            if new_params_only_steps and not self.new_params:
                raise ValueError("model.new_params_only_steps > 0 but the model adds no parameters to the base "
                                 "checkpoint (no cross layers, no pos_conv): nothing to train in stage 1")
            log.info("loaded base %s: %d tensors; new: %d", base_checkpoint, len(report["loaded"]), len(report["new"]))
        if freeze_vision:
            lvlm.vision.requires_grad_(False)
        self.tasks = list(tasks)
        self.val_task_acc = GroupedAccuracy(self.tasks)
        self.val_difficulty_acc = GroupedAccuracy(["easy", "hard"])
        self.skipped = {"train": Counter(), "val": Counter()}
        self._step_times: List[float] = []
        self.pad_id = 0
        self._val_flops: List[SampleFlops] = []

    # -- modes ----------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.hparams.freeze_vision:
            self.lvlm.vision.eval()  # frozen encoder: batch-norm statistics stay as trained
        return self

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        self.pad_id = tok.pad_id if tok is not None else 0
        if tok is not None and tok.vocab_size > self.lvlm.decoder.config.vocab_size:
            raise ValueError(f"model.lvlm.init_args.decoder.vocab_size={self.lvlm.decoder.config.vocab_size} is "
                             f"smaller than the tokenizer's {tok.vocab_size} tokens")
        if dm is not None and getattr(dm.hparams, "image_size", None) not in (None, self.lvlm.vision.image_size):
            raise ValueError(f"data.image_size={dm.hparams.image_size} differs from "
                             f"model.lvlm.init_args.vision.init_args.image_size={self.lvlm.vision.image_size}")

    def _set_stage(self) -> None:
        """Stage 1 (new parameters only) for the first `new_params_only_steps` steps, then stage 2."""
        n = self.hparams.new_params_only_steps
        if not n:
            return
        stage2 = self.global_step >= n
        new = set(self.new_params)
        for name, p in self.named_parameters():
            if name in new or (self.hparams.freeze_vision and name.startswith("lvlm.vision.")):
                continue
            p.requires_grad_(stage2)

    # -- steps ----------------------------------------------------------------------------------
    def _loss(self, batch: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.lvlm(batch["images"], batch["input_ids"])  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        return loss, logits

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.hparams.freeze_vision and self.lvlm.vision.training:
            self.lvlm.vision.eval()  # Lightning restores per-module modes after validation
        self._set_stage()
        self._t0 = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.skipped["train"].update(batch["skipped"])
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["task"]))
        return loss

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self._step_times.append(time.perf_counter() - self._t0)
        if len(self._step_times) >= 20:
            self.log("train/steps_per_sec", len(self._step_times) / sum(self._step_times))
            self._step_times.clear()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.skipped["val"].update(batch["skipped"])
        loss, logits = self._loss(batch)
        correct = exact_match(logits, batch["labels"])
        self.val_task_acc.update(correct, batch["task"])
        self.val_difficulty_acc.update(correct, batch["difficulty"])
        B = len(batch["task"])
        # Per-sample GFLOPs with each sample's own (unpadded) text length.
        lengths = (batch["input_ids"] != self.pad_id).sum(1).tolist()
        flops = [sample_flops(self.lvlm, t) for t in lengths]
        self.log("val/loss", loss, batch_size=B)
        self._val_flops += flops

    def on_validation_epoch_end(self) -> None:
        tasks, difficulty = self.val_task_acc.compute(), self.val_difficulty_acc.compute()
        for name, acc in tasks.items():
            self.log(f"val/acc/{name}" if name != "all" else "val/acc", acc)
        for name, acc in difficulty.items():
            if name != "all":
                self.log(f"val/acc/{name}", acc)
        n = max(1, len(self._val_flops))  # per-sample means over the whole validation set
        gflops = sum(f.llm for f in self._val_flops) / n / 1e9
        self.log("val/gflops", gflops)
        self.log("val/gflops_total", sum(f.total for f in self._val_flops) / n / 1e9)
        self._val_flops = []
        if not self.trainer.sanity_checking:
            parts = [f"{k} {100 * float(v):.1f}" for k, v in {**difficulty, **tasks}.items() if k != "all"]
            rank_zero_info(f"[val] step {self.global_step} ({self.lvlm.plan}): accuracy % " + ", ".join(parts)
                           + f"; LLM GFLOPs/sample {gflops:.3f}")
        self.val_task_acc.reset()
        self.val_difficulty_acc.reset()
        self._report_skipped("val")

    def on_train_epoch_end(self) -> None:
        self._report_skipped("train")

    def _report_skipped(self, split: str) -> None:
        counts = self.skipped[split]
        if counts:
            for reason, n in counts.items():
                self.log(f"data/{split}_skipped/{reason}", float(n))
            log.warning("%s epoch: skipped or altered samples: %s", split, dict(counts))
        counts.clear()

    # -- optimiser ------------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW in four groups (new / base parameters x decay / no decay). Each group warms up
        linearly then decays by cosine to `min_lr_ratio`; base parameters start their warmup when
        stage 2 starts (step `new_params_only_steps`), so unfreezing the pretrained decoder with
        empty Adam state is not a full-LR shock."""
        h = self.hparams
        new = set(self.new_params)
        groups = {(is_new, decays): [] for is_new in (True, False) for decays in (True, False)}
        seen = set()
        for n, p in self.named_parameters():
            if (h.freeze_vision and n.startswith("lvlm.vision.")) or id(p) in seen:
                continue
            seen.add(id(p))
            decays = p.dim() >= 2 and "embed" not in n
            groups[(n in new or not new, decays)].append(p)  # no base checkpoint: everything is "new"
        param_groups, starts = [], []
        for (is_new, decays), params in groups.items():
            if params:
                param_groups.append({"params": params, "weight_decay": h.weight_decay if decays else 0.0})
                starts.append(0 if is_new else h.new_params_only_steps)
        opt = torch.optim.AdamW(param_groups, lr=h.lr, betas=h.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [functools.partial(warmup_cosine, start=s, warmup=h.warmup_steps, total=total,
                                    min_ratio=h.min_lr_ratio) for s in starts])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(step: int, start: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: 0 before `start`, linear warmup over `warmup` steps, cosine to `min_ratio` at `total`."""
    if step < start:
        return 0.0
    step -= start
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - start - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
