"""What both LVLM LightningModules share (VisorLitModule, PolicyLitModule): the datamodule's
tokenizer and the config checks against it, frozen parts held in eval mode, sharding, validation
accuracy per task and difficulty, and cached greedy answers for `predict`."""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Sequence, Tuple

import lightning as L
import torch

from src.lit.batch import image_at
from src.lit.distributed import hold_gathered, shard_for_strategy
from src.lit.predict import log_cache_report, prediction_rows
from src.metrics import GroupedAccuracy, accuracy_logs
from src.models.generation import generate
from src.models.lvlm import VisorLVLM


LVLM_FIELD = "model.lvlm.init_args"  # = model.init_args.lvlm.init_args (src/cli.py)


class LVLMModule(L.LightningModule):
    """A subclass calls `_init_lvlm` in its __init__ (after save_hyperparameters) and says what stays
    frozen (`hold_frozen_eval`). Its LVLM's config sits at `LVLM_FIELD` (named in errors)."""

    def _init_lvlm(self, lvlm: VisorLVLM, tasks: Sequence[str]) -> None:
        self.lvlm = lvlm
        self.tasks = list(tasks)
        self.val_task_acc = GroupedAccuracy(self.tasks)
        self.val_difficulty_acc = GroupedAccuracy(["easy", "hard"])
        self.pad_id = 0
        self.tokenizer = None  # the datamodule's, from setup(); predict decodes with it
        self._predict_seen: Counter = Counter()

    # -- modes ----------------------------------------------------------------------------------
    def hold_frozen_eval(self, training: bool) -> None:
        """Put the frozen parts in eval mode (norm statistics fixed); `training`: the fit's mode."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.hold_frozen_eval(mode)
        return self

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.hold_frozen_eval(True)  # Lightning restores per-module modes after validation

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        self.pad_id = tok.pad_id if tok is not None else 0
        self.tokenizer = tok
        vocab = self.lvlm.decoder.config.vocab_size
        if tok is not None and tok.vocab_size > vocab:
            raise ValueError(f"{LVLM_FIELD}.decoder.vocab_size={vocab} is smaller than the tokenizer's "
                             f"{tok.vocab_size} tokens")
        size = self.lvlm.vision.image_size
        if dm is not None and getattr(dm.hparams, "image_size", None) not in (None, size):
            raise ValueError(f"data.image_size={dm.hparams.image_size} differs from "
                             f"{LVLM_FIELD}.vision.init_args.image_size={size}")

    def configure_model(self) -> None:
        shard_for_strategy(self.lvlm, self.trainer)  # sharded training only (configs/strategy/fsdp.yaml)

    # -- validation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        hold_gathered(self.lvlm, True)

    def on_validation_epoch_end(self) -> None:
        hold_gathered(self.lvlm, False)

    def log_accuracy(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Log the epoch's accuracy per task and difficulty (reduced across ranks) and reset it
        -> (per task, per difficulty)."""
        tasks, difficulty = self.val_task_acc.compute(), self.val_difficulty_acc.compute()
        self.log_dict(accuracy_logs(tasks, difficulty))
        self.val_task_acc.reset()
        self.val_difficulty_acc.reset()
        return tasks, difficulty

    # -- predict --------------------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._predict_seen = Counter()
        log_cache_report(self.lvlm)
        hold_gathered(self.lvlm, True)

    def on_predict_epoch_end(self) -> None:
        hold_gathered(self.lvlm, False)

    def answer_rows(self, batch: dict, prompt: torch.Tensor, lens: torch.Tensor, budget, **kwargs) -> List[dict]:
        """Cached greedy answers to prompt (B, P) of lens (B,) (src.lit.predict.split_prompt) at `budget`
        (see src.models.generation.generate) -> one JSON-ready row per sample."""
        out = generate(self.lvlm, batch["images"], prompt, lens, self.hparams.max_new_tokens, budget=budget,
                       eos_id=getattr(self.tokenizer, "eos_id", None), pad_id=self.pad_id, image_at=image_at(batch),
                       **kwargs)
        return prediction_rows(self.lvlm, batch, prompt, lens, out, self.tokenizer, self._predict_seen)
