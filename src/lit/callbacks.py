"""Callbacks: export the trained LVLM as a shippable base checkpoint with its manifest."""
from __future__ import annotations

import logging
from typing import Optional

import lightning as L

from src.lit.checkpoint_io import data_tokenizer, dtype_named, export_checkpoint, fit_manifest
from src.lit.distributed import whole_state_dict

log = logging.getLogger(__name__)


class ExportCheckpoint(L.Callback):
    """At the end of fit, write `dirpath/model.safetensors` (in `dtype`: float16, the default, halves
    the file; bfloat16 keeps a bf16 model's range; float32 every bit) and `manifest.json` (recipe,
    commit, data seed, steps, last validation metrics)."""

    def __init__(self, dirpath: str, config_path: Optional[str] = None, dtype: str = "float16") -> None:
        self.dirpath, self.config_path = dirpath, config_path
        self.dtype = dtype_named(dtype, "ExportCheckpoint.dtype")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = whole_state_dict(pl_module.lvlm)  # on every rank: gathering a sharded model is collective
        if not trainer.is_global_zero:
            return
        manifest = {**fit_manifest(trainer, self.config_path), "module": dict(pl_module.hparams)}
        out = export_checkpoint(pl_module.lvlm, self.dirpath, manifest, data_tokenizer(trainer.datamodule), state,
                                self.dtype)
        log.info("exported base checkpoint to %s (val/acc=%s)", out, manifest["validation"].get("val/acc"))
