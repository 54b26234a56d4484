"""What DDP needs from this project's modules, set on the strategy before Lightning wraps the model
(a module's `setup` runs first), so `--trainer.strategy ddp` works as configs/strategy/ddp.yaml does.

- broadcast_buffers off: DDP otherwise broadcasts rank 0's buffers at every forward, validation's
  included, and ranks whose validation shares differ by a batch would wait for each other for good.
  No buffer here needs it: the frozen encoder's batch-norm statistics are held fixed, RoPE tables
  are constants, and the router's feature statistics (the policy stage) follow each rank's batches.
- find_unused_parameters on where a step may skip layers (optional self layers of a universal
  model): their parameters get no gradient that step.
Both are set whatever the strategy's arguments say (a LightningCLI strategy spells out every
DistributedDataParallel default, so a given value cannot be told from a default): neither is a
preference here, the other value hangs or fails.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info


def prepare_ddp(trainer: L.Trainer, skips_layers: bool) -> None:
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DDPStrategy):
        return
    kwargs = strategy._ddp_kwargs  # what DDPStrategy passes to DistributedDataParallel
    needed = {"broadcast_buffers": False, **({"find_unused_parameters": True} if skips_layers else {})}
    for name, value in needed.items():
        if kwargs.get(name, not value) != value:
            rank_zero_info(f"DDP: {name}={value} (src/lit/distributed.py says why)")
        kwargs[name] = value


def is_distributed(trainer: L.Trainer) -> bool:
    return getattr(trainer, "world_size", 1) > 1


def gather_lists(values: Dict[str, list]) -> Dict[str, list]:
    """Per-sample lists kept by each rank -> every rank's, concatenated in rank order (one process:
    as given). For epoch-end statistics that are not torchmetrics states (budget mixes per task)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    gathered: List[Optional[Dict[str, list]]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    return {k: [x for part in gathered for x in part[k]] for k in values}
