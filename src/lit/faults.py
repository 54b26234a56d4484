"""Runs that can stop at any moment and go on where they were.

- `AtomicCheckpointIO`: a checkpoint is written to `<name>.tmp`, flushed to disk, then renamed over
  the old one, so a process killed while writing leaves the previous `last.ckpt` loadable.
- `StopOnSigterm`: on SIGTERM (a scheduler's pre-emption, `kill`) Lightning finishes the current
  step and raises SIGTERMException; this saves `last.ckpt` where the ModelCheckpoint callback
  writes it, and `src.cli.main` then exits with status 143 and a line saying how to resume.
Both are installed by the CLI for every run (src/cli.py). The data stream's position on a resume
is the datamodule's part (VQADataModule.train_dataloader).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where this fit's `last.ckpt` goes: the ModelCheckpoint's folder, else <default_root_dir>/checkpoints."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
    return Path(dirpath) / "last.ckpt"


class StopOnSigterm(L.Callback):
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM at step {trainer.global_step}: saved {path}; resume with the same command and "
                       f"--ckpt_path {path}")
