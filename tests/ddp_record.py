"""A callback the two-process tests pass on the command line (`--trainer.callbacks+=tests.ddp_record.Record`):
each rank writes what the test compares, since the ranks are processes of their own."""
import json
from pathlib import Path

import lightning as L
import torch


class Record(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, module) -> None:
        """rank<r>_weights.pt: every trainable-or-not parameter of the LVLM as this rank ends (a
        sharded one gathered whole, which every rank does in the same order)."""
        self.out.mkdir(parents=True, exist_ok=True)
        whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.lvlm.state_dict().items()}
        torch.save({k: v.detach().clone() for k, v in whole.items()}, self.out / f"rank{trainer.global_rank}_weights.pt")

    def on_validation_end(self, trainer, module) -> None:
        """rank<r>_metrics.json: the logged validation metrics (reduced across ranks) this rank sees."""
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        (self.out / f"rank{trainer.global_rank}_metrics.json").write_text(json.dumps(metrics, sort_keys=True))


class SignalAt(L.Callback):
    """Sends this process `signal` (a name: SIGKILL, SIGTERM) at the end of training step `step`."""

    def __init__(self, step: int, signal: str) -> None:
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            import os
            import signal as signals
            os.kill(os.getpid(), getattr(signals, self.signal))


class StopAt(L.Callback):
    """Ends the fit cleanly on every rank at the end of training step `step` (all ranks reach it together)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True
