// Shared input checks of visor::scatter_add_rows (CPU and CUDA kernels alike).
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

}  // namespace visor
