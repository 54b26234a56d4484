"""Loads the compiled extension (src/_C) if it was built; otherwise the references are used.

Set VISOR_DISABLE_EXT=1 to force the pure-PyTorch references. One warning says which path runs."""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache


@lru_cache(maxsize=None)
def extension_available() -> bool:
    if os.environ.get("VISOR_DISABLE_EXT") == "1":
        warnings.warn("VISOR_DISABLE_EXT=1: using the pure-PyTorch reference ops", stacklevel=2)
        return False
    try:
        importlib.import_module("src._C")
    except ImportError as e:
        warnings.warn(f"VISOR C++ extension not built ({e}); using the pure-PyTorch reference ops. "
                      "Build it with `pip install --no-build-isolation -e .`", stacklevel=2)
        return False
    from src.ops import registry  # noqa: F401  (fake kernels and autograd for the C++ ops)
    return True
