// Schema of the VISOR ops. One TORCH_LIBRARY_IMPL per backend lives in cpu/ and cuda/;
// fake (meta) kernels and autograd are registered from Python (src/ops/registry.py).
#include <torch/library.h>
#include <Python.h>

TORCH_LIBRARY(visor, m) {
  // out = x.clone(); out[index[k]] += delta[k] for every k (duplicates accumulate).
  // x (N, D), index (K,) int64 in [0, N), delta (K, D) -> (N, D). The scatter half of gated layer skipping.
  m.def("scatter_add_rows(Tensor x, Tensor index, Tensor delta) -> Tensor");
}

// Makes `import src._C` work; the ops register themselves when the library loads.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "VISOR C++/CUDA ops", -1, nullptr};
  return PyModule_Create(&def);
}
