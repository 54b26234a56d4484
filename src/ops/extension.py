"""Loads the compiled extension (src/_C) if it was built; otherwise the references are used.

Set VISOR_DISABLE_EXT=1 to force the pure-PyTorch references. One warning says which path runs."""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache


# Every op csrc/ defines: an extension built from older sources lacks some and is not used.
OPS = ("scatter_add_rows", "gather_rows", "cross_attention", "cross_attention_backward")


@lru_cache(maxsize=None)
def extension_available() -> bool:
    if os.environ.get("VISOR_DISABLE_EXT") == "1":
        warnings.warn("VISOR_DISABLE_EXT=1: using the pure-PyTorch reference ops", stacklevel=2)
        return False
    import torch  # loads libc10 / libtorch, which src._C links against

    try:
        importlib.import_module("src._C")
    except ImportError as e:
        warnings.warn(f"VISOR C++ extension not built or not loadable ({e}); using the pure-PyTorch reference ops. "
                      "Build it with `make build`", stacklevel=2)
        return False
    missing = [op for op in OPS if not hasattr(torch.ops.visor, op)]
    if missing:
        warnings.warn(f"the built VISOR C++ extension is stale (it lacks {', '.join(missing)}); using the "
                      "pure-PyTorch reference ops. Rebuild it with `make build`", stacklevel=2)
        return False
    from src.ops import registry  # noqa: F401  (fake kernels, autograd and FLOP formulas of the C++ ops)
    return True
