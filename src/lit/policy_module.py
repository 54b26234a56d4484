"""LightningModule of the policy stage: the universal LVLM frozen, only the budget router trains.

Modes (see src/lit/policy_objectives.py):
- `reinforce` (default): sample a budget per sample from the router; reward = answer quality
  (`exact_match`, or `nll`: minus the answer's mean token NLL) - cost_weight x relative LLM FLOPs;
  baseline `moving_average` or `greedy` (the reward of the router's argmax budget); entropy bonus.
- `pseudo_label`: every budget is evaluated on the sample; the label is the cheapest budget within
  `pseudo_label_rel` of the best score; cross-entropy.

Validation runs the router in its inference mode (`inference`: policy | max | min | target | an
index; `target_cost` for `target`) and logs accuracy per task and difficulty at that operating
point, mean GFLOPs, the budget histogram overall and per difficulty, the router's entropy and the
mean reward.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F

from src.data.generator import TASKS
from src.flops import sample_flops
from src.lit.base import LVLMModule
from src.lit.batch import answer_logits, image_at, image_sizes, query_index
from src.lit.checkpoint_io import load_base_checkpoint
from src.lit.distributed import gather_lists, is_sharded, prepare_ddp
from src.lit.frozen import hold_eval
from src.lit.predict import split_prompt
from src.lit.policy_objectives import MovingAverageBaseline, pseudo_labels, reinforce_loss
from src.metrics import answer_nll, exact_match
from src.models.lvlm import VisorLVLM
from src.models.policy import select_budgets

log = logging.getLogger(__name__)

MODES = ("reinforce", "pseudo_label")
REWARDS = ("exact_match", "nll")
BASELINES = ("moving_average", "greedy")


class PolicyLitModule(LVLMModule):
    """Args:
        lvlm: the universal VISOR model with a router (`policy_hidden`) and optional self layers.
        universal_checkpoint: the exported universal model (safetensors dir); everything but the router.
            None: no weights loaded here (a fitted policy checkpoint is loaded afterwards: evaluation).
        mode, reward, cost_weight, baseline, baseline_momentum, entropy_coef, pseudo_label_rel: see above.
        inference, target_cost: how validation and `predict` pick budgets.
        max_new_tokens: the longest answer `predict` generates (cached greedy, stops at eos).
        lr, weight_decay: AdamW on the router.
    """

    def __init__(
        self,
        lvlm: VisorLVLM,
        universal_checkpoint: Optional[str],
        mode: str = "reinforce",
        reward: str = "exact_match",
        cost_weight: float = 0.3,
        baseline: str = "moving_average",
        baseline_momentum: float = 0.9,
        entropy_coef: float = 0.01,
        pseudo_label_rel: float = 0.99,
        inference: Union[int, str] = "policy",
        target_cost: Optional[float] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        tasks: Sequence[str] = TASKS,
        max_new_tokens: int = 16,
    ) -> None:
        super().__init__()
        for name, value, allowed in (("mode", mode, MODES), ("reward", reward, REWARDS),
                                     ("baseline", baseline, BASELINES)):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {value!r}")
        if cost_weight < 0 or entropy_coef < 0 or lr <= 0:
            raise ValueError("model.cost_weight and model.entropy_coef must be >= 0 and model.lr > 0")
        if not 0 < pseudo_label_rel <= 1:
            raise ValueError(f"model.pseudo_label_rel must be in (0, 1], got {pseudo_label_rel}")
        if max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens must be >= 1, got {max_new_tokens}")
        if inference == "target" and target_cost is None:
            raise ValueError("model.inference: target needs model.target_cost (mean relative LLM FLOPs, e.g. 0.6)")
        if lvlm.policy is None or lvlm.plan.first_optional is None:
            raise ValueError("the policy stage needs model.lvlm.init_args.policy_hidden and a plan with "
                             "optional_self layers")
        if universal_checkpoint is not None and not Path(universal_checkpoint).exists():
            raise FileNotFoundError(f"model.universal_checkpoint={universal_checkpoint} does not exist: train one with "
                                    "configs/visor.yaml + configs/universal.yaml (its export is the checkpoint)")
        self.save_hyperparameters(ignore=["lvlm"])
        self._init_lvlm(lvlm, tasks)
        if universal_checkpoint is not None:
            router = [n for n in lvlm.state_dict() if n.startswith("policy.")]  # weights and feature statistics
            load_base_checkpoint(lvlm, universal_checkpoint, may_lack=router,
                                 field_prefix="model.init_args.lvlm.init_args.decoder.")
        for n, p in lvlm.named_parameters():
            p.requires_grad_(n.startswith("policy."))
        self.n_budgets = lvlm.plan.n_budgets
        self.moving_baseline = MovingAverageBaseline(baseline_momentum)
        self._val: Dict[str, List] = {"budgets": [], "difficulty": [], "task": [], "gflops": [], "entropy": [],
                                      "reward": []}

    def hold_frozen_eval(self, training: bool) -> None:
        """The LVLM is frozen (norm statistics fixed, no dropout); the router alone follows the fit's
        mode, so its feature standardisation learns its statistics from the training batches."""
        hold_eval(self.lvlm)
        self.lvlm.policy.train(training)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if is_sharded(self.trainer):
            raise ValueError("trainer.strategy: the policy stage trains only the router, which sharding does not "
                             "help; use configs/strategy/ddp.yaml")
        prepare_ddp(self.trainer, skips_layers=False)  # only the router trains, and it runs for every sample
        if stage == "fit" and self.hparams.universal_checkpoint is None and self.trainer.ckpt_path is None:
            raise ValueError("model.init_args.universal_checkpoint is null: the router would learn over an untrained "
                             "model; give the universal export (configs/visor.yaml + configs/universal.yaml)")

    # -- pieces ---------------------------------------------------------------------------------
    def _prompt_mask(self, batch: dict) -> torch.Tensor:
        """(B, T) bool: the question tokens (not answers, not padding) the router pools."""
        return (batch["labels"] == -100) & (batch["input_ids"] != self.pad_id)

    def _budget_flops(self, batch: dict, lengths: Optional[List[int]] = None) -> torch.Tensor:
        """(B, K) float64: every budget's LLM FLOPs for each sample at `lengths` text tokens (default
        its own unpadded length)."""
        if lengths is None:
            lengths = (batch["input_ids"] != self.pad_id).sum(1).tolist()
        at = image_at(batch)
        rows = [[sample_flops(self.lvlm, int(t), k, hw, at).llm for k in range(self.n_budgets)]
                for t, hw in zip(lengths, image_sizes(batch))]
        return torch.tensor(rows, dtype=torch.float64, device=batch["input_ids"].device)

    def _costs(self, flops: torch.Tensor) -> torch.Tensor:
        """(B, K) budget FLOPs -> relative to the largest budget's, float32."""
        largest = self.lvlm.plan.largest_budget
        return (flops / flops[:, largest:largest + 1]).float()

    def _reward(self, logits: torch.Tensor, labels: torch.Tensor, costs: torch.Tensor,
                budgets: torch.Tensor) -> torch.Tensor:
        """(B,) answer quality - cost_weight x the chosen budget's relative cost."""
        return self._quality(logits, labels) - self.hparams.cost_weight * costs.gather(1, budgets[:, None]).squeeze(1)

    def _quality(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) answer quality: exact match in {0, 1}, or minus the mean NLL of the answer tokens.
        logits (N, vocab) at the answer positions of labels (B, T)."""
        if self.hparams.reward == "exact_match":
            return exact_match(logits, labels).float()
        return -answer_nll(logits, labels)

    def _run(self, batch: dict, choose):
        """-> (answer logits (N, vocab), router logits (B, K), budgets (B,))."""
        labels = batch["labels"]
        return self.lvlm.routed(batch["images"], batch["input_ids"], self._prompt_mask(batch), choose,
                                query_index(labels), logits_at=labels != -100, image_at=image_at(batch))

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h = self.hparams
        B = batch["input_ids"].shape[0]
        costs = self._costs(self._budget_flops(batch))  # (B, K)
        if h.mode == "pseudo_label":
            with torch.no_grad():
                scores = torch.stack([self._quality(answer_logits(self.lvlm, batch, k),
                                                    batch["labels"]) for k in range(self.n_budgets)], dim=1)
            labels = pseudo_labels(scores, costs.mean(0), h.pseudo_label_rel)
            _, router_logits, _ = self._run(batch, lambda logits: labels)
            loss = F.cross_entropy(router_logits.float(), labels)
            self.log("train/label_mean_cost", costs.mean(0)[labels].mean(), batch_size=B)
        else:
            logits, router_logits, actions = self._run(
                batch, lambda l: torch.distributions.Categorical(logits=l.detach().float()).sample())
            reward = self._reward(logits.detach(), batch["labels"], costs, actions)
            if h.baseline == "greedy":
                with torch.no_grad():
                    greedy = router_logits.argmax(-1)
                    g_logits = answer_logits(self.lvlm, batch, greedy)
                    base = self._reward(g_logits, batch["labels"], costs, greedy)
            else:
                base = self.moving_baseline(reward)
            loss, entropy = reinforce_loss(router_logits, actions, reward, base, h.entropy_coef)
            self.log("train/reward", reward.mean(), prog_bar=True, batch_size=B)
            self.log("train/entropy", entropy, batch_size=B)
            self.log("train/mean_cost", costs.gather(1, actions[:, None]).mean(), batch_size=B)
        self.log("train/loss", loss, batch_size=B)
        return loss

    # -- validation -----------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        flops = self._budget_flops(batch)  # (B, K)
        costs = self._costs(flops)
        plan = self.lvlm.plan

        def choose(router_logits):
            return select_budgets(router_logits, h.inference, costs.mean(0), h.target_cost,
                                  plan.largest_budget, plan.smallest_budget)

        logits, router_logits, budgets = self._run(batch, choose)
        correct = exact_match(logits, batch["labels"])
        self.val_task_acc.update(correct, batch["task"])
        self.val_difficulty_acc.update(correct, batch["difficulty"])
        logp = F.log_softmax(router_logits.float(), -1)
        reward = self._reward(logits, batch["labels"], costs, budgets)
        v = self._val
        v["budgets"] += budgets.tolist()
        v["difficulty"] += list(batch["difficulty"])
        v["task"] += list(batch["task"])
        v["gflops"] += (flops.gather(1, budgets[:, None]).squeeze(1) / 1e9).tolist()
        v["entropy"] += (-(logp.exp() * logp).sum(-1)).tolist()
        v["reward"] += reward.tolist()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        tasks, difficulty = self.log_accuracy()
        v = gather_lists(self._val)  # every rank's samples
        n = max(1, len(v["budgets"]))
        gflops = sum(v["gflops"]) / n
        self.log("val/gflops", gflops)
        self.log("val/entropy", sum(v["entropy"]) / n)
        self.log("val/reward", sum(v["reward"]) / n)
        budgets = torch.tensor(v["budgets"], dtype=torch.long)
        by_difficulty = {g: torch.tensor([d == g for d in v["difficulty"]], dtype=torch.bool) for g in ("easy", "hard")}
        by_task = {t: torch.tensor([x == t for x in v["task"]], dtype=torch.bool) for t in self.tasks}
        for k in range(self.n_budgets):
            self.log(f"val/budget_frac/{k}", (budgets == k).float().mean() if len(budgets) else 0.0)
            for g, sel in {**by_difficulty, **by_task}.items():  # per difficulty and per task
                if sel.any() or g in by_difficulty:
                    frac = (budgets[sel] == k).float().mean() if sel.any() else torch.tensor(0.0)
                    self.log(f"val/budget_frac/{g}/{k}", frac)
        experiment = getattr(self.logger, "experiment", None)
        if len(budgets) and hasattr(experiment, "add_histogram") and not self.trainer.sanity_checking:
            experiment.add_histogram("val/budget", budgets, self.global_step, bins=self.n_budgets)
            for g, sel in by_difficulty.items():
                if sel.any():
                    experiment.add_histogram(f"val/budget/{g}", budgets[sel], self.global_step, bins=self.n_budgets)
        if not self.trainer.sanity_checking:
            frac = [f"{(budgets == k).float().mean().item():.2f}" for k in range(self.n_budgets)] if len(budgets) else []
            rank_zero_info(f"[val] step {self.global_step} policy ({self.hparams.inference}): accuracy % "
                           + ", ".join(f"{k} {100 * float(a):.1f}" for k, a in {**difficulty, **tasks}.items())
                           + f"; LLM GFLOPs/sample {gflops:.3f}; budget fractions {frac}")
        self._val = {k: [] for k in self._val}

    # -- predict --------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> List[dict]:
        """Cached greedy answers to the batch's questions (the prompt only; see src/lit/predict.py),
        budgets chosen by the router at the prefill in the `inference` mode (relative costs at the
        prompt lengths; the router pools the same question tokens as in validation) -> one row per sample."""
        h, plan = self.hparams, self.lvlm.plan
        prompt, lens = split_prompt(batch, self.pad_id)
        costs = self._costs(self._budget_flops(batch, lens.tolist())).mean(0).to(prompt.device)  # (K,)

        def choose(router_logits):
            return select_budgets(router_logits, h.inference, costs, h.target_cost, plan.largest_budget,
                                  plan.smallest_budget)

        mask = self._prompt_mask(batch)[:, : prompt.shape[1]]  # (B, P)
        return self.answer_rows(batch, prompt, lens, choose, prompt_mask=mask)

    def configure_optimizers(self):
        params = [p for p in self.lvlm.policy.parameters()]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
