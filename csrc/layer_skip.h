// Gated layer skipping: an optional layer runs only for the samples whose gate is on. The active
// samples' rows are gathered (visor::gather_rows), the layer runs on them, and its output is added
// back to the residual stream in one pass (visor::scatter_add_rows: x[index] += delta).
// Shared input checks of both ops (CPU and CUDA kernels alike).
#pragma once
#include <ATen/ATen.h>

namespace visor {

inline void check_scatter_add_rows_inputs(const at::Tensor& x, const at::Tensor& index, const at::Tensor& delta) {
  TORCH_CHECK(x.dim() == 2 && delta.dim() == 2, "scatter_add_rows: x (N, D) and delta (K, D) expected");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == delta.size(0),
              "scatter_add_rows: index must be (K,) with K = delta.size(0)");
  TORCH_CHECK(x.size(1) == delta.size(1), "scatter_add_rows: x and delta differ in D");
  TORCH_CHECK(index.scalar_type() == at::kLong, "scatter_add_rows: index must be int64");
  TORCH_CHECK(x.scalar_type() == delta.scalar_type(), "scatter_add_rows: x and delta dtypes differ");
  TORCH_CHECK(x.device() == index.device() && x.device() == delta.device(), "scatter_add_rows: tensors on different devices");
}

inline void check_gather_rows_inputs(const at::Tensor& x, const at::Tensor& index) {
  TORCH_CHECK(x.dim() == 2, "gather_rows: x (N, D) expected, got ", x.sizes());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "gather_rows: index must be (K,) int64");
  TORCH_CHECK(x.device() == index.device(), "gather_rows: tensors on different devices");
}

}  // namespace visor
