#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../layer_skip.h"

namespace visor {

// Every index in [0, N): a row outside would be read or written out of bounds. Names the bad index.
static void check_rows_in_range(const int64_t* ip, int64_t K, int64_t N, const char* op) {
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ip[k] >= 0 && ip[k] < N, op, ": index ", ip[k], " out of range [0, ", N, ")");
  }
}

// Parallel over column blocks, serial over rows inside a block: duplicate indices never race.
at::Tensor scatter_add_rows_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& delta) {
  check_scatter_add_rows_inputs(x, index, delta);
  auto out = x.contiguous().clone();
  auto d = delta.contiguous();
  auto idx = index.contiguous();
  const int64_t N = x.size(0), K = d.size(0), D = x.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  check_rows_in_range(ip, K, N, "scatter_add_rows");
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

// Parallel over output rows: each row is one contiguous copy.
at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& index) {
  check_gather_rows_inputs(x, index);
  auto src = x.contiguous();
  auto idx = index.contiguous();
  const int64_t N = x.size(0), K = idx.size(0), D = x.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  check_rows_in_range(ip, K, N, "gather_rows");
  auto out = at::empty({K, D}, x.options());
  if (K * D == 0) return out;
  const int64_t bytes = D * static_cast<int64_t>(x.element_size());
  const char* sp = static_cast<const char*>(src.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, K, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, bytes)), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) std::memcpy(op + k * bytes, sp + ip[k] * bytes, bytes);
  });
  return out;
}

}  // namespace visor

TORCH_LIBRARY_IMPL(visor, CPU, m) {
  m.impl("scatter_add_rows", &visor::scatter_add_rows_cpu);
  m.impl("gather_rows", &visor::gather_rows_cpu);
}
