// Schema of the VISOR ops. One TORCH_LIBRARY_IMPL per backend lives in cpu/ and cuda/;
// fake (meta) kernels and autograd are registered from Python (src/ops/registry.py).
#include <torch/library.h>
#include <Python.h>

TORCH_LIBRARY(visor, m) {
  // out = x.clone(); out[index[k]] += delta[k] for every k (duplicates accumulate).
  // x (N, D), index (K,) int64 in [0, N), delta (K, D) -> (N, D). The scatter half of gated layer skipping.
  m.def("scatter_add_rows(Tensor x, Tensor index, Tensor delta) -> Tensor");
  // out = x[index]: x (N, D), index (K,) int64 in [0, N) -> (K, D). The gather half of gated layer skipping.
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  // Text queries over visual keys (no mask), GQA without expanding k/v; see cross_attention.h.
  // q (B, H, T, hd), k, v (B, Hkv, V, hd), kv_lens (B,) or None -> out (B, H, T, hd), lse (B, H, T).
  m.def("cross_attention(Tensor q, Tensor k, Tensor v, Tensor? kv_lens, float scale) -> (Tensor, Tensor)");
  // -> (dq, dk, dv). grad_lse may be None (the log-sum-exp was not used).
  m.def("cross_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor? kv_lens, float scale) -> (Tensor, Tensor, Tensor)");
}

// Makes `import src._C` work; the ops register themselves when the library loads.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "VISOR C++/CUDA ops", -1, nullptr};
  return PyModule_Create(&def);
}
