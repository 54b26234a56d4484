"""Python face of csrc/: the attention dispatch point and registered ops with pure-PyTorch references.

Importing the package loads the extension when it was built (one warning otherwise), which also
registers its fake kernels, autograd and FLOP formulas: a FlopCounterMode created afterwards counts
the ops (it copies the formula registry when it is created). It also gives the counter the CPU
attention kernel's formula, which torch lacks (src/ops/sdpa_flops.py)."""
from src.ops import sdpa_flops  # noqa: F401
from src.ops.extension import extension_available

extension_available()
