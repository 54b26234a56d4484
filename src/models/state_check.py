"""One comparison of a model's state dict with a loaded one, shared by every strict loader."""
from __future__ import annotations

from typing import Iterable, List, Mapping, Tuple

import torch


def state_differences(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                      may_lack: Iterable[str] = ()) -> Tuple[List[str], List[str], List[str]]:
    """-> (missing, unexpected, mis-shaped), each sorted: names `expected` has and `found` lacks
    (except `may_lack`), names only `found` has, and "name: checkpoint (shape) vs model (shape)"."""
    allowed = set(may_lack)
    missing = sorted(set(expected) - set(found) - allowed)
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(expected) & set(found) if found[k].shape != expected[k].shape)
    return missing, unexpected, misshaped
