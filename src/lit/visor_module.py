"""LightningModule: trains a VisorLVLM (loss on answer tokens only), at one budget or over all of them.

Universal training (one set of weights for every budget of the plan): `budget_sampling: uniform`
trains one random feasible budget per step (the paper), `sandwich` the largest, the smallest and
one random budget per step with the losses summed (slimmable networks). Validation then evaluates
every budget: accuracy per difficulty and per task and GFLOPs per budget, logged as
`val/acc@budget=<k>`, `val/acc/<difficulty or task>@budget=<k>` and as an accuracy-vs-GFLOPs
chart and table in TensorBoard.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from src.data.generator import TASKS
from src.flops import sample_flops
from src.lit.batch import answer_logits, image_at, image_sizes
from src.lit.checkpoint_io import load_base_checkpoint
from src.lit.base import LVLMModule
from src.lit.distributed import is_distributed, prepare_ddp
from src.lit.frozen import hold_eval
from src.lit.predict import split_prompt
from src.metrics import GroupedAccuracy, MeanFlops, exact_match
from src.models.lvlm import VisorLVLM
from src.plots import to_tensorboard, xy_chart

BUDGET_SAMPLING = ("largest", "uniform", "sandwich")
FROZEN_EMBEDDINGS = ("lvlm.decoder.embed_tokens.", "lvlm.decoder.lm_head.")

log = logging.getLogger(__name__)


class VisorLitModule(LVLMModule):
    """Universal entry point for base training, VISOR conversion and baselines.

    Args:
        lvlm: the model (class_path/init_args in YAML).
        base_checkpoint: a shipped base LVLM (safetensors) to convert; new VISOR parts keep their init.
        freeze_vision: keep the vision encoder frozen (and its norm statistics fixed).
        freeze_embeddings: keep the token embedding (and a tied LM head, the same tensor) frozen. At a
            real vocabulary its gradient is a dense vocab x d tensor every step whatever few rows the
            batch used (Qwen2: 151936 x 896, about 1.8 s of a CPU training step).
        new_params_only_steps: for the first N steps train only the parameters the base lacks
            (cross sublayers, positional conv); then everything not frozen.
        lr, min_lr_ratio, warmup_steps, weight_decay, betas: AdamW with linear warmup, cosine decay.
        tasks: task names for per-task validation accuracy.
        budget_sampling: which budgets a training step runs: `largest` (default), `uniform`,
            `sandwich`, or a budget index (train at that budget only).
        distill_weight: in-place distillation (slimmable networks) under `sandwich`: each smaller
            budget's loss is (1 - w) x its answer NLL + w x KL(the largest budget's answer
            distribution of the same step, detached || its own); 0 (default): the NLL only.
        predict_budget: the budget `predict` answers at (None: the largest).
        max_new_tokens: the longest answer `predict` generates (cached greedy, stops at eos).
    """

    def __init__(
        self,
        lvlm: VisorLVLM,
        base_checkpoint: Optional[str] = None,
        freeze_vision: bool = False,
        freeze_embeddings: bool = False,
        new_params_only_steps: int = 0,
        lr: float = 2e-3,
        min_lr_ratio: float = 0.05,
        warmup_steps: int = 100,
        weight_decay: float = 0.05,
        betas: Tuple[float, float] = (0.9, 0.95),
        tasks: Sequence[str] = TASKS,
        budget_sampling: Union[int, str] = "largest",
        distill_weight: float = 0.0,
        predict_budget: Optional[int] = None,
        max_new_tokens: int = 16,
    ) -> None:
        super().__init__()
        n_budgets = lvlm.plan.n_budgets
        if isinstance(budget_sampling, int):
            lvlm.plan.budget_index(budget_sampling, "model.budget_sampling")
        elif budget_sampling not in BUDGET_SAMPLING:
            raise ValueError(f"model.budget_sampling must be one of {BUDGET_SAMPLING} or a budget index, "
                             f"got {budget_sampling!r}")
        if not 0 <= distill_weight <= 1:
            raise ValueError(f"model.distill_weight must be in [0, 1], got {distill_weight}")
        if distill_weight and budget_sampling != "sandwich":
            raise ValueError(f"model.distill_weight={distill_weight} needs model.budget_sampling: sandwich (the largest "
                             f"budget teaches the others in the same step), got {budget_sampling!r}")
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        lvlm.plan.budget_index(predict_budget, "model.predict_budget")
        if max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0 or new_params_only_steps < 0:
            raise ValueError("model.warmup_steps and model.new_params_only_steps must be >= 0")
        if new_params_only_steps and base_checkpoint is None:
            raise ValueError("model.new_params_only_steps needs model.base_checkpoint (new relative to what?)")
        self.save_hyperparameters(ignore=["lvlm"])
        self._init_lvlm(lvlm, tasks)
        self.new_params: List[str] = []
        if base_checkpoint is not None:
            if not Path(base_checkpoint).exists():
                raise FileNotFoundError(
                    f"model.base_checkpoint={base_checkpoint} does not exist: train a base with configs/base.yaml and "
                    "export it with `python -m src.export --config configs/base.yaml --ckpt <last.ckpt> --out <dir>`")
            report = load_base_checkpoint(lvlm, base_checkpoint, field_prefix="model.lvlm.init_args.decoder.")
            self.new_params = ["lvlm." + n for n in report["new"]]
            if new_params_only_steps and not self.new_params:
                raise ValueError("model.new_params_only_steps > 0 but the model adds no parameters to the base "
                                 "checkpoint (no cross layers, no pos_conv): nothing to train in stage 1")
            log.info("loaded base %s: %d tensors; new: %d", base_checkpoint, len(report["loaded"]), len(report["new"]))
        if freeze_vision:
            lvlm.vision.requires_grad_(False)
        if freeze_embeddings:
            lvlm.decoder.embed_tokens.requires_grad_(False)
            lvlm.decoder.lm_head.requires_grad_(False)
        self.val_budgets = list(range(n_budgets)) if n_budgets > 1 else []  # evaluated besides the largest
        self.val_budget_acc = torch.nn.ModuleList(GroupedAccuracy(["easy", "hard"]) for _ in self.val_budgets)
        self.val_budget_task_acc = torch.nn.ModuleList(GroupedAccuracy(self.tasks) for _ in self.val_budgets)
        self.val_budget_flops = torch.nn.ModuleList(MeanFlops() for _ in self.val_budgets)
        self.skipped = {"train": Counter(), "val": Counter()}
        self._step_times: List[float] = []
        self.val_flops = MeanFlops()  # per-sample means over the whole validation set, every rank's
        # the mean NLL per answer token over the whole set (however it is batched or shared out)
        self.val_loss = MeanMetric().set_dtype(torch.float64)
        self._stage2: Optional[bool] = None  # the training stage the requires_grad flags are set for

    # -- modes ----------------------------------------------------------------------------------
    def hold_frozen_eval(self, training: bool) -> None:
        if self.hparams.freeze_vision:
            hold_eval(self.lvlm.vision)  # frozen encoder: batch-norm statistics stay as trained

    def setup(self, stage: str) -> None:
        super().setup(stage)
        prepare_ddp(self.trainer, skips_layers=self.lvlm.plan.n_budgets > 1)
        if stage == "fit":
            self._set_stage()  # before Lightning's model summary, so it counts this phase's trainable parameters

    def _set_stage(self) -> None:
        """Stage 1 (new parameters only) for the first `new_params_only_steps` steps, then stage 2."""
        n = self.hparams.new_params_only_steps
        if not n:
            return
        stage2 = self.global_step >= n
        if self._stage2 == stage2:
            return
        self._stage2 = stage2
        # DDP fixes the parameters it synchronises when it wraps the model: under it the base stays
        # trainable and stage 1 drops the base's gradients before each optimizer step instead
        # (on_before_optimizer_step), which leaves AdamW's updates and state as in one process.
        for p in self._stage2_params():
            p.requires_grad_(stage2 or is_distributed(self.trainer))
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info("step %d: stage %d, %s trainable parameters (%s)", self.global_step, 2 if stage2 else 1,
                 f"{trainable:,}", "all not frozen" if stage2 else "the new parts only")

    def _stage2_params(self) -> List[torch.nn.Parameter]:
        """The parameters stage 1 holds still: the base's, less what stays frozen throughout."""
        new = set(self.new_params)
        return [p for name, p in self.named_parameters()
                if not (name in new or (self.hparams.freeze_vision and name.startswith("lvlm.vision."))
                        or (self.hparams.freeze_embeddings and name.startswith(FROZEN_EMBEDDINGS)))]

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._stage2 is False and is_distributed(self.trainer):
            for p in self._stage2_params():
                p.grad = None

    # -- steps ----------------------------------------------------------------------------------
    def _loss(self, batch: dict, budget: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = answer_logits(self.lvlm, batch, budget)  # (N answer tokens, vocab)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels[labels != -100])
        return loss, logits

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._set_stage()
        self._t0 = time.perf_counter()

    def step_budgets(self, step: int) -> List[int]:
        """The budgets training step `step` runs, drawn from the step and the run's seed: every rank
        draws the same (a rank's own RNG would differ), a resumed run repeats them, and seeds differ.
        The seed is seed_everything's (PL_GLOBAL_SEED, inherited by every rank); seed 0 draws by the
        step alone."""
        plan, mode = self.lvlm.plan, self.hparams.budget_sampling
        if isinstance(mode, int):
            return [mode]
        if mode == "largest":
            return [plan.largest_budget]
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        rng = random.Random(step + (seed << 32))
        pick = rng.randrange(plan.n_budgets)
        if mode == "uniform":
            return [pick]
        return list(dict.fromkeys([plan.largest_budget, plan.smallest_budget, pick]))  # sandwich

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.skipped["train"].update(batch["skipped"])
        B = len(batch["task"])
        total = 0.0
        budgets = self.step_budgets(self.global_step)
        w, teacher = self.hparams.distill_weight, None
        for k in budgets:  # sandwich: the largest first
            loss, logits = self._loss(batch, k)
            if w and k == self.lvlm.plan.largest_budget:
                teacher = F.log_softmax(logits.detach().float(), dim=-1)  # (N answer tokens, vocab)
            elif w and teacher is not None:
                kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), teacher, log_target=True, reduction="batchmean")
                self.log(f"train/distill_kl@budget={k}", kl, batch_size=B)
                loss = (1 - w) * loss + w * kl
            total = total + loss
            if len(budgets) > 1 or self.val_budgets:
                self.log(f"train/loss@budget={k}", loss, batch_size=B)
        self.log("train/loss", total, prog_bar=True, batch_size=B)
        return total

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
        # Per-sample GFLOPs with each sample's own (unpadded) text length.
        lengths = (batch["input_ids"] != self.pad_id).sum(1).tolist()
        sizes, at = image_sizes(batch), image_at(batch)
        flops = [sample_flops(self.lvlm, t, image_hw=hw, image_at=at) for t, hw in zip(lengths, sizes)]
        self.val_loss.update(loss.detach().double(), weight=int((batch["labels"] != -100).sum()))
        self.val_flops.update(flops)
        for j, k in enumerate(self.val_budgets):  # every budget of a universal model
            if k == self.lvlm.plan.largest_budget:
                correct_k = correct
            else:
                _, logits_k = self._loss(batch, k)
                correct_k = exact_match(logits_k, batch["labels"])
            self.val_budget_acc[j].update(correct_k, batch["difficulty"])
            self.val_budget_task_acc[j].update(correct_k, batch["task"])
            self.val_budget_flops[j].update([sample_flops(self.lvlm, t, k, hw, at) for t, hw in zip(lengths, sizes)])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        tasks, difficulty = self.log_accuracy()
        means = self.val_flops.compute()
        gflops = means["llm"]
        self.log("val/loss", float(self.val_loss.compute()))
        self.val_loss.reset()
        self.log("val/gflops", gflops)
        self.log("val/gflops_total", means["total"])
        self.val_flops.reset()
        if not self.trainer.sanity_checking:
            parts = [f"{k} {100 * float(v):.1f}" for k, v in {**difficulty, **tasks}.items() if k != "all"]
            rank_zero_info(f"[val] step {self.global_step} ({self.lvlm.plan}): accuracy % " + ", ".join(parts)
                           + f"; LLM GFLOPs/sample {gflops:.3f}")
        self._log_budget_curve()
        self._report_skipped("val")

    def _log_budget_curve(self) -> None:
        """Per-budget accuracy and GFLOPs: scalars, and (TensorBoard) the curve as a chart and a table."""
        if not self.val_budgets:
            return
        plan, rows = self.lvlm.plan, []
        for j, k in enumerate(self.val_budgets):
            acc = {g: float(v) for g, v in self.val_budget_acc[j].compute().items()}
            tasks = {t: float(v) for t, v in self.val_budget_task_acc[j].compute().items() if t != "all"}
            gflops = self.val_budget_flops[j].compute()["llm"]
            self.val_budget_acc[j].reset()
            self.val_budget_task_acc[j].reset()
            self.val_budget_flops[j].reset()
            self.log(f"val/acc@budget={k}", acc["all"])
            for g, value in {"easy": acc["easy"], "hard": acc["hard"], **tasks}.items():
                self.log(f"val/acc/{g}@budget={k}", value)
            self.log(f"val/gflops@budget={k}", gflops)
            rows.append((k, plan.budget_name(k), gflops, acc))
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.sanity_checking or not hasattr(experiment, "add_image"):
            return
        chart = xy_chart({g: [(r[2], 100 * r[3][g]) for r in rows] for g in ("all", "easy", "hard")},
                         title=f"accuracy vs LLM GFLOPs per budget, step {self.global_step}",
                         xlabel="LLM GFLOPs per sample", ylabel="accuracy %")
        experiment.add_image("val/acc_vs_gflops", to_tensorboard(chart), self.global_step, dataformats="HWC")
        table = ["| budget | layers | LLM GFLOPs | acc | easy | hard |", "|---|---|---|---|---|---|"]
        table += [f"| {k} | {name} | {g:.3f} | {100 * a['all']:.1f} | {100 * a['easy']:.1f} | {100 * a['hard']:.1f} |"
                  for k, name, g, a in rows]
        experiment.add_text("val/budgets", "\n".join(table), self.global_step)

    def on_train_epoch_end(self) -> None:
        self._report_skipped("train")

    def _report_skipped(self, split: str) -> None:
        counts = self.skipped[split]
        if counts:
            for reason, n in counts.items():
                self.log(f"data/{split}_skipped/{reason}", float(n))
            log.warning("%s epoch: skipped or altered samples: %s", split, dict(counts))
        counts.clear()

    # -- predict --------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> List[dict]:
        """Cached greedy answers to the batch's questions (the prompt only; see src/lit/predict.py)
        at `predict_budget` -> one JSON-ready row per sample (the JsonlPredictionWriter writes them)."""
        prompt, lens = split_prompt(batch, self.pad_id)
        return self.answer_rows(batch, prompt, lens, self.hparams.predict_budget)

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
            if (h.freeze_vision and n.startswith("lvlm.vision.")) or id(p) in seen or \
                    (h.freeze_embeddings and n.startswith(FROZEN_EMBEDDINGS)):
                continue
            seen.add(id(p))
            decays = weight_decays(n, p)
            groups[(n in new or not new, decays)].append(p)  # no base checkpoint: everything is "new"
        param_groups, starts = [], []
        for (is_new, decays), params in groups.items():
            if params:
                param_groups.append({"params": params, "weight_decay": h.weight_decay if decays else 0.0})
                starts.append(0 if is_new else h.new_params_only_steps)
        # fused: one kernel over all tensors (0.11 s against foreach's 1.1 s for Qwen2-0.5B's 352 M
        # non-embedding parameters on 2 CPU cores), the same update
        opt = torch.optim.AdamW(param_groups, lr=h.lr, betas=h.betas, fused=True)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [functools.partial(warmup_cosine, start=s, warmup=h.warmup_steps, total=total,
                                    min_ratio=h.min_lr_ratio) for s in starts])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def weight_decays(name: str, param: torch.nn.Parameter) -> bool:
    """AdamW decays matrices, not biases, norms or embeddings."""
    return param.dim() >= 2 and "embed" not in name


def warmup_cosine(step: int, start: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: 0 before `start`, linear warmup over `warmup` steps, cosine to `min_ratio` at `total`."""
    if step < start:
        return 0.0
    step -= start
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - start - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
