#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../scatter_add_rows.h"

namespace visor {

// Parallel over column blocks, serial over rows inside a block: duplicate indices never race.
at::Tensor scatter_add_rows_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& delta) {
  check_scatter_add_rows_inputs(x, index, delta);
  auto out = x.contiguous().clone();
  auto d = delta.contiguous();
  auto idx = index.contiguous();
  const int64_t N = x.size(0), K = d.size(0), D = x.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ip[k] >= 0 && ip[k] < N, "scatter_add_rows: index ", ip[k], " out of range [0, ", N, ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_add_rows_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* dp = d.data_ptr<scalar_t>();
    at::parallel_for(0, D, 256, [&](int64_t c0, int64_t c1) {
      for (int64_t k = 0; k < K; ++k) {
        scalar_t* row = op + ip[k] * D;
        const scalar_t* src = dp + k * D;
        for (int64_t c = c0; c < c1; ++c) {
          using acc_t = at::opmath_type<scalar_t>;  // float for half/bf16, the type itself otherwise
          row[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) + static_cast<acc_t>(src[c]));
        }
      }
    });
  });
  return out;
}

}  // namespace visor

TORCH_LIBRARY_IMPL(visor, CPU, m) { m.impl("scatter_add_rows", &visor::scatter_add_rows_cpu); }
