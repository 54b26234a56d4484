"""What data-parallel training needs from this project's modules: DDP's settings (`prepare_ddp`)
and sharded training (FSDP2, `ShardedDataParallel` + `shard_lvlm`), as configs/strategy/ddp.yaml
and configs/strategy/fsdp.yaml use them.

DDP: set on the strategy before Lightning wraps the model (a module's `setup` runs first), so
`--trainer.strategy ddp` works as configs/strategy/ddp.yaml does.

- broadcast_buffers off: DDP otherwise broadcasts rank 0's buffers at every forward, validation's
  included, and ranks whose validation shares differ by a batch would wait for each other for good.
  No buffer here needs it: the frozen encoder's batch-norm statistics are held fixed, RoPE tables
  are constants, and the router's feature statistics (the policy stage) follow each rank's batches.
- find_unused_parameters on where a step may skip layers (optional self layers of a universal
  model): their parameters get no gradient that step.
Both are set whatever the strategy's arguments say (a LightningCLI strategy spells out every
DistributedDataParallel default, so a given value cannot be told from a default): neither is a
preference here, the other value hangs or fails.

FSDP2 (torch's `fully_shard`, through Lightning's ModelParallelStrategy, which the installed
Lightning recommends over its FSDP1 strategy; FSDP1 also refuses CPU processes): each decoder layer
is a sharded unit, the rest of the LVLM (embeddings, cross sublayers, projector, router) the root
unit, and a frozen vision tower stays outside every unit, whole on each rank. A unit all-gathers
its weights each time it is entered, so ranks must enter units equally often:
- training: a step's budget is the same on every rank (drawn from the global step), and per-sample
  budgets run every optional self layer as the same row groups on every rank
  (`Decoder.same_calls_on_every_rank`);
- validation, prediction and generation (ranks hold different numbers of batches, answers end at
  different steps) run on weights gathered once per epoch (`hold_gathered`): no collective inside
  a forward, at the memory of one whole model per rank.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
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


class ShardedDataParallel(ModelParallelStrategy):
    """FSDP2 over every process (data_parallel_size = devices x nodes, no tensor parallelism), with a
    checkpoint the rest of the project reads: one full `.ckpt` written by rank 0 (not a folder of
    shards). activation_checkpointing: decoder layers recompute their activations in backward."""

    def __init__(self, activation_checkpointing: bool = True, save_distributed_checkpoint: bool = False,
                 process_group_backend: Optional[str] = None, timeout: Optional[timedelta] = default_pg_timeout) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict:
        """Lightning's load of a full checkpoint, except for the optimizer state of parameters the
        optimizer had not stepped yet (the base parameters of a run saved in stage 1, whose gradients
        are dropped; optional layers no drawn budget ran): the checkpoint has none, and they get none
        here either, so their first step is a first step as in the run that saved it. (Lightning's
        one `strict` flag covers the model and the optimizer, and torch's non-strict optimizer load
        gives every parameter a state stepped once with zero gradients, which changes Adam's bias
        correction: the flag is lifted, the model's tensor names checked here, those states dropped.)"""
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        module, path = self.lightning_module, Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a folder of shards: Lightning's own load
            return super().load_checkpoint(path, weights_only)
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
        names, ours = set(saved["state_dict"]), set(self.model.state_dict())
        if module.strict_loading and names != ours:
            raise RuntimeError(f"{path}: its model state differs from the model's: missing "
                               f"{sorted(ours - names)[:10]}, unexpected {sorted(names - ours)[:10]}")
        strict, module.strict_loading = module.strict_loading, False
        try:
            out = super().load_checkpoint(path, weights_only)
        finally:
            module.strict_loading = strict
        params = dict(self.model.named_parameters())
        for optimizer, state in zip(self.optimizers, saved.get("optimizer_states", [])):
            if state["state"] and isinstance(next(iter(state["state"])), int):  # saved by position: to names
                state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
            for name in params.keys() - set(state["state"]):
                optimizer.state.pop(params[name], None)
        return out


def is_sharded(trainer: Optional[L.Trainer]) -> bool:
    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def shard_for_strategy(lvlm: torch.nn.Module, trainer: L.Trainer) -> None:
    """A module's `configure_model`: `shard_lvlm` under ShardedDataParallel (once), else nothing."""
    from torch.distributed.fsdp import FSDPModule

    if is_sharded(trainer) and not isinstance(lvlm, FSDPModule):
        strategy = trainer.strategy
        shard_lvlm(lvlm, strategy.device_mesh["data_parallel"], getattr(strategy, "activation_checkpointing", False))


def shard_lvlm(lvlm: torch.nn.Module, mesh, activation_checkpointing: bool = False) -> None:
    """FSDP2 over `mesh` (a 1-D DeviceMesh): each decoder layer a unit, the rest of the LVLM the
    root unit, the frozen vision parameters outside every unit (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    dec = lvlm.decoder
    if dec.fastv is not None:
        raise ValueError("model.lvlm.init_args.token_reducer: FastV reads a layer's weights outside its forward, "
                         "which sharded training does not gather; use configs/strategy/ddp.yaml")
    dec.same_calls_on_every_rank = True
    for layer in dec.layers:
        layer.checkpointed = activation_checkpointing
        fully_shard(layer, mesh=mesh)
    frozen = {p for p in lvlm.vision.parameters() if not p.requires_grad}
    fully_shard(lvlm, mesh=mesh, ignored_params=frozen)


def hold_gathered(lvlm: torch.nn.Module, on: bool) -> None:
    """on: gather every unit's weights and keep them gathered across forwards (an evaluation
    epoch's start); off: shard them again (its end). Nothing unless the LVLM is sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(lvlm, FSDPModule):
        return
    for unit in lvlm.modules():
        if not isinstance(unit, FSDPModule):
            continue
        if unit is not lvlm:  # the root unit keeps its own rule (it stays gathered after forward)
            unit.set_reshard_after_forward(not on, recurse=False)
        if on:
            unit.unshard()
        else:
            unit.reshard()


def whole_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """module.state_dict(); of a sharded module, gathered whole on CPU (a collective: every rank calls
    it; ranks other than 0 get {})."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
