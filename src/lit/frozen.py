"""Keeping a frozen part of a LightningModule in eval mode for the whole fit.

A `train()` override is not enough: Lightning captures every submodule's mode before a
validation loop and restores it afterwards (and a freshly built module starts in train mode), so a
frozen vision encoder's batch norms would go back to updating their running statistics from the
training batches, and a "frozen" model would drift under the policy stage (docs/findings.md, "A
frozen encoder that was not"). Call `hold_eval` from `train()` and at every training batch start.
"""
from __future__ import annotations

from torch import nn


def hold_eval(module: nn.Module) -> None:
    """Put `module` and all its submodules in eval mode if any of them is training."""
    if any(m.training for m in module.modules()):
        module.eval()
