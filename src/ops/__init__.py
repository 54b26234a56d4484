"""Python face of csrc/: the attention dispatch point and registered ops with pure-PyTorch references.

Importing the package loads the extension when it was built (one warning otherwise), which also
registers its fake kernels, autograd and FLOP formulas: a FlopCounterMode created afterwards counts
the ops (it copies the formula registry when it is created). Attention's formulas under the project's
convention (causal halved, the CPU kernel counted) are src/ops/sdpa_flops.py's, which
`src.flops.measured_flops` passes to the counter."""
from src.ops.extension import extension_available

extension_available()
