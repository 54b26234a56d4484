#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../layer_skip.h"

namespace visor {

template <typename scalar_t>
__global__ void scatter_add_rows_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ delta,
                                        const int64_t* __restrict__ index, int64_t K, int64_t D) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= K * D) return;
  const int64_t k = i / D, c = i % D;
  gpuAtomicAdd(out + index[k] * D + c, delta[i]);  // atomics: duplicate indices accumulate
}

// Every index in [0, N), at the cost of one sync: a row outside would be read or written out of bounds.
static void check_rows_in_range(const at::Tensor& idx, int64_t N, const char* op) {
  TORCH_CHECK(((idx >= 0) & (idx < N)).all().item<bool>(), op, ": index out of range [0, ", N, ")");
}

at::Tensor scatter_add_rows_cuda(const at::Tensor& x, const at::Tensor& index, const at::Tensor& delta) {
  check_scatter_add_rows_inputs(x, index, delta);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = x.contiguous().clone();
  auto d = delta.contiguous();
  auto idx = index.contiguous();
  const int64_t K = d.size(0), D = x.size(1);
  if (K * D == 0) return out;
  check_rows_in_range(idx, x.size(0), "scatter_add_rows");
  const int threads = 256;
  const int64_t blocks = (K * D + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_add_rows_cuda", [&] {
    scatter_add_rows_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), K, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename scalar_t>
__global__ void gather_rows_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                   const int64_t* __restrict__ index, int64_t K, int64_t D) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= K * D) return;
  out[i] = x[index[i / D] * D + i % D];
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_gather_rows_inputs(x, index);
  c10::cuda::CUDAGuard guard(x.device());
  auto src = x.contiguous();
  auto idx = index.contiguous();
  const int64_t K = idx.size(0), D = x.size(1);
  auto out = at::empty({K, D}, x.options());
  if (K * D == 0) return out;
  check_rows_in_range(idx, x.size(0), "gather_rows");
  const int threads = 256;
  const int64_t blocks = (K * D + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_rows_cuda", [&] {
    gather_rows_kernel<scalar_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), K, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace visor

TORCH_LIBRARY_IMPL(visor, CUDA, m) {
  m.impl("scatter_add_rows", &visor::scatter_add_rows_cuda);
  m.impl("gather_rows", &visor::gather_rows_cuda);
}
