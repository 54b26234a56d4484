// CUDA kernels of visor::cross_attention: forward (with log-sum-exp), a split-KV path for few query
// rows (decoding) with a combine step, and backward (dq; dk and dv).
//
// Flash-attention-style tiling with an online softmax, in SIMT form (no tensor-core MMA yet):
// a block owns one (batch, kv head) and kRowsPerBlock query rows (rows are the G = H / Hkv query
// heads sharing the kv head, times the T queries: grouped-query attention without expanding k/v);
// it walks the keys in tiles of 32 held in shared memory in the accumulation type. Each warp owns
// kRowsPerWarp rows; lane j scores key j of the tile, so a tile's scores need no shuffles, and the
// output accumulator of a row is spread over the lanes (DPL = ceil(hd / 32) dims per lane).
// Key rows in shared memory are padded by one element so lanes reading different keys hit
// different banks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../cross_attention.h"

namespace visor {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kKeys = 32;  // keys per tile: one per lane
constexpr int kThreads = kWarps * kWarp;
constexpr unsigned kFull = 0xffffffffu;

template <typename scalar_t>
struct Strided {  // (B, heads, S, hd) with a contiguous last dim
  const scalar_t* p;
  int64_t sb, sh, ss;
  __device__ const scalar_t* at(int64_t b, int64_t h, int64_t s) const { return p + b * sb + h * sh + s * ss; }
};

template <typename scalar_t>
Strided<scalar_t> strided(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2)};
}

struct Dims {
  int64_t B, H, Hkv, G, T, V, hd, R;  // R = G * T rows per (batch, kv head)
};

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t x) {
  for (int o = kWarp / 2; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t* a, const acc_t* b, int n) {
  acc_t s = 0;
  for (int d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// (b, kv head, row r) -> offset of the row in (B, H, T)
__device__ __forceinline__ int64_t row_offset(const Dims& s, int64_t b, int64_t hk, int64_t r) {
  return (b * s.H + hk * s.G + r / s.T) * s.T + r % s.T;
}

// Rows [row0, row0 + n) of (b, hk) into shared memory (n, stride), times `mult`; rows past R are zero.
template <typename scalar_t, typename acc_t>
__device__ void load_rows(const Strided<scalar_t>& src, const Dims& s, int64_t b, int64_t hk, int64_t row0, int n,
                          int stride, acc_t mult, acc_t* dst) {
  for (int i = threadIdx.x; i < n * s.hd; i += blockDim.x) {
    const int rr = i / s.hd, d = i % s.hd;
    const int64_t r = row0 + rr;
    dst[rr * stride + d] = r < s.R ? mult * static_cast<acc_t>(src.at(b, hk * s.G + r / s.T, r % s.T)[d]) : acc_t(0);
  }
}

// Keys [j0, j0 + n) of (b, hk) into shared memory (kKeys-or-fewer rows, stride); rows past n are zero.
template <typename scalar_t, typename acc_t>
__device__ void load_keys(const Strided<scalar_t>& src, const Dims& s, int64_t b, int64_t hk, int64_t j0, int n,
                          int rows, int stride, acc_t* dst) {
  for (int i = threadIdx.x; i < rows * s.hd; i += blockDim.x) {
    const int j = i / s.hd, d = i % s.hd;
    dst[j * stride + d] = j < n ? static_cast<acc_t>(src.at(b, hk, j0 + j)[d]) : acc_t(0);
  }
}

// grid (row blocks, B * Hkv, splits). splits == 1: writes out and lse; else partial (normalised) outputs
// and log-sum-exps per split, merged by combine_kernel.
template <typename scalar_t, typename acc_t, int DPL>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Strided<scalar_t> q, Strided<scalar_t> k, Strided<scalar_t> v, const int* lens, Dims s, acc_t scale,
                   int64_t keys_per_split, scalar_t* out, acc_t* lse, acc_t* part_o, acc_t* part_lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ks = reinterpret_cast<acc_t*>(smem_raw);  // (kKeys, hd + 1)
  acc_t* vs = ks + kKeys * (s.hd + 1);              // (kKeys, hd)
  acc_t* qs = vs + kKeys * s.hd;                    // (kRowsPerBlock, hd)
  const int hd = static_cast<int>(s.hd), kst = hd + 1;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.y / s.Hkv, hk = blockIdx.y % s.Hkv, row0 = int64_t(blockIdx.x) * kRowsPerBlock;
  const int64_t L = lens[b], split = blockIdx.z;
  const int64_t j0 = min(L, split * keys_per_split), j1 = min(L, j0 + keys_per_split);

  load_rows(q, s, b, hk, row0, kRowsPerBlock, hd, scale, qs);
  acc_t m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DPL];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = neg_inf<acc_t>();
    l[i] = 0;
#pragma unroll
    for (int c = 0; c < DPL; ++c) acc[i][c] = 0;
  }
  for (int64_t jt = j0; jt < j1; jt += kKeys) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kKeys), j1 - jt));
    __syncthreads();  // the previous tile is consumed (first pass: nothing)
    load_keys(k, s, b, hk, jt, n, kKeys, kst, ks);
    load_keys(v, s, b, hk, jt, n, kKeys, hd, vs);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int rr = warp * kRowsPerWarp + i;
      if (row0 + rr >= s.R) break;  // warp-uniform
      const acc_t sc = lane < n ? dot(qs + rr * hd, ks + lane * kst, hd) : neg_inf<acc_t>();
      const acc_t mx = max(m[i], warp_max(sc));
      const acc_t p = lane < n ? exp(sc - mx) : acc_t(0);
      const acc_t corr = exp(m[i] - mx);  // m = -inf on the first tile: 0
      l[i] = l[i] * corr + warp_sum(p);
#pragma unroll
      for (int c = 0; c < DPL; ++c) acc[i][c] *= corr;
      for (int j = 0; j < n; ++j) {
        const acc_t pj = __shfl_sync(kFull, p, j);
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
          const int d = lane + c * kWarp;
          if (d < hd) acc[i][c] += pj * vs[j * hd + d];
        }
      }
      m[i] = mx;
    }
  }
  const int64_t n_rows = s.B * s.H * s.T;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = row0 + warp * kRowsPerWarp + i;
    if (r >= s.R) break;
    const int64_t row = row_offset(s, b, hk, r);
    const acc_t inv = l[i] > 0 ? acc_t(1) / l[i] : acc_t(0);
    const acc_t row_lse = l[i] > 0 ? m[i] + log(l[i]) : neg_inf<acc_t>();
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + c * kWarp;
      if (d >= hd) continue;
      if (part_o == nullptr) {
        out[row * hd + d] = static_cast<scalar_t>(acc[i][c] * inv);
      } else {
        part_o[(split * n_rows + row) * hd + d] = acc[i][c] * inv;
      }
    }
    if (lane == 0) {
      if (part_lse == nullptr) {
        lse[row] = row_lse;
      } else {
        part_lse[split * n_rows + row] = row_lse;
      }
    }
  }
}

// Merges the splits of every row through their log-sum-exps: one thread per (row, dim).
template <typename scalar_t, typename acc_t>
__global__ void combine_kernel(const acc_t* part_o, const acc_t* part_lse, int64_t splits, int64_t n_rows, int64_t hd,
                               scalar_t* out, acc_t* lse) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= n_rows * hd) return;
  const int64_t row = idx / hd, d = idx % hd;
  acc_t mx = neg_inf<acc_t>();
  for (int64_t sp = 0; sp < splits; ++sp) mx = max(mx, part_lse[sp * n_rows + row]);
  acc_t total = 0, val = 0;
  if (mx != neg_inf<acc_t>()) {
    for (int64_t sp = 0; sp < splits; ++sp) {
      const acc_t w = exp(part_lse[sp * n_rows + row] - mx);
      total += w;
      val += w * part_o[(sp * n_rows + row) * hd + d];
    }
  }
  out[idx] = static_cast<scalar_t>(total > 0 ? val / total : acc_t(0));
  if (d == 0) lse[row] = total > 0 ? mx + log(total) : neg_inf<acc_t>();
}

// Backward, dq: same tiling as the forward. dS = P * (dP - Delta), dq = scale * dS K.
template <typename scalar_t, typename acc_t, int DPL>
__global__ void __launch_bounds__(kThreads)
    backward_dq_kernel(Strided<scalar_t> q, Strided<scalar_t> k, Strided<scalar_t> v, Strided<scalar_t> dout,
                       const acc_t* lse, const acc_t* delta, const int* lens, Dims s, acc_t scale, acc_t* dq) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int hd = static_cast<int>(s.hd), kst = hd + 1;
  acc_t* ks = reinterpret_cast<acc_t*>(smem_raw);  // (kKeys, hd + 1)
  acc_t* vs = ks + kKeys * kst;                     // (kKeys, hd + 1)
  acc_t* qs = vs + kKeys * kst;                     // (kRowsPerBlock, hd)
  acc_t* dos = qs + kRowsPerBlock * hd;             // (kRowsPerBlock, hd)
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.y / s.Hkv, hk = blockIdx.y % s.Hkv, row0 = int64_t(blockIdx.x) * kRowsPerBlock;
  const int64_t L = lens[b];
  load_rows(q, s, b, hk, row0, kRowsPerBlock, hd, scale, qs);
  load_rows(dout, s, b, hk, row0, kRowsPerBlock, hd, acc_t(1), dos);
  acc_t g[kRowsPerWarp][DPL], row_lse[kRowsPerWarp], row_delta[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = row0 + warp * kRowsPerWarp + i;
    row_lse[i] = r < s.R ? lse[row_offset(s, b, hk, r)] : acc_t(0);
    row_delta[i] = r < s.R ? delta[row_offset(s, b, hk, r)] : acc_t(0);
#pragma unroll
    for (int c = 0; c < DPL; ++c) g[i][c] = 0;
  }
  for (int64_t jt = 0; jt < L; jt += kKeys) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kKeys), L - jt));
    __syncthreads();
    load_keys(k, s, b, hk, jt, n, kKeys, kst, ks);
    load_keys(v, s, b, hk, jt, n, kKeys, kst, vs);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int rr = warp * kRowsPerWarp + i;
      if (row0 + rr >= s.R) break;
      acc_t ds = 0;
      if (lane < n) {
        const acc_t p = exp(dot(qs + rr * hd, ks + lane * kst, hd) - row_lse[i]);
        ds = p * (dot(dos + rr * hd, vs + lane * kst, hd) - row_delta[i]);
      }
      for (int j = 0; j < n; ++j) {
        const acc_t dsj = __shfl_sync(kFull, ds, j);
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
          const int d = lane + c * kWarp;
          if (d < hd) g[i][c] += dsj * ks[j * kst + d];
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = row0 + warp * kRowsPerWarp + i;
    if (r >= s.R) break;
    const int64_t row = row_offset(s, b, hk, r);
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + c * kWarp;
      if (d < hd) dq[row * hd + d] = scale * g[i][c];
    }
  }
}

// Backward, dk and dv: a block owns kRowsPerBlock keys of one (batch, kv head) (kRowsPerWarp per warp) and
// walks all R rows in tiles of 32 (one row per lane). dv = P^T dO, dk = scale * dS^T Q.
template <typename scalar_t, typename acc_t, int DPL>
__global__ void __launch_bounds__(kThreads)
    backward_dkdv_kernel(Strided<scalar_t> q, Strided<scalar_t> k, Strided<scalar_t> v, Strided<scalar_t> dout,
                         const acc_t* lse, const acc_t* delta, const int* lens, Dims s, acc_t scale, acc_t* dk,
                         acc_t* dv) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int hd = static_cast<int>(s.hd), rst = hd + 1;
  acc_t* qs = reinterpret_cast<acc_t*>(smem_raw);  // (32, hd + 1), scaled queries
  acc_t* dos = qs + kWarp * rst;                    // (32, hd + 1)
  acc_t* ks = dos + kWarp * rst;                    // (kRowsPerBlock, hd)
  acc_t* vs = ks + kRowsPerBlock * hd;              // (kRowsPerBlock, hd)
  acc_t* lse_s = vs + kRowsPerBlock * hd;           // (32,)
  acc_t* delta_s = lse_s + kWarp;                   // (32,)
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.y / s.Hkv, hk = blockIdx.y % s.Hkv, key0 = int64_t(blockIdx.x) * kRowsPerBlock;
  const int64_t L = lens[b];
  if (key0 >= L) return;  // keys past kv_lens: zero gradient (dk, dv start at zero); block-uniform
  const int n_keys = static_cast<int>(min(static_cast<int64_t>(kRowsPerBlock), L - key0));
  load_keys(k, s, b, hk, key0, n_keys, kRowsPerBlock, hd, ks);
  load_keys(v, s, b, hk, key0, n_keys, kRowsPerBlock, hd, vs);
  acc_t gk[kRowsPerWarp][DPL], gv[kRowsPerWarp][DPL];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
    for (int c = 0; c < DPL; ++c) gk[i][c] = gv[i][c] = 0;
  }
  for (int64_t r0 = 0; r0 < s.R; r0 += kWarp) {
    const int nr = static_cast<int>(min(static_cast<int64_t>(kWarp), s.R - r0));
    __syncthreads();
    load_rows(q, s, b, hk, r0, kWarp, rst, scale, qs);
    load_rows(dout, s, b, hk, r0, kWarp, rst, acc_t(1), dos);
    if (threadIdx.x < kWarp) {
      const int64_t r = r0 + threadIdx.x;
      lse_s[threadIdx.x] = r < s.R ? lse[row_offset(s, b, hk, r)] : acc_t(0);
      delta_s[threadIdx.x] = r < s.R ? delta[row_offset(s, b, hk, r)] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int jj = warp * kRowsPerWarp + i;
      if (jj >= n_keys) break;  // warp-uniform
      acc_t p = 0, ds = 0;
      if (lane < nr) {
        p = exp(dot(qs + lane * rst, ks + jj * hd, hd) - lse_s[lane]);
        ds = p * (dot(dos + lane * rst, vs + jj * hd, hd) - delta_s[lane]);
      }
      for (int r = 0; r < nr; ++r) {
        const acc_t pr = __shfl_sync(kFull, p, r), dsr = __shfl_sync(kFull, ds, r);
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
          const int d = lane + c * kWarp;
          if (d < hd) {
            gv[i][c] += pr * dos[r * rst + d];
            gk[i][c] += dsr * qs[r * rst + d];  // qs carries the scale
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int jj = warp * kRowsPerWarp + i;
    if (jj >= n_keys) break;
    const int64_t off = ((b * s.Hkv + hk) * s.V + key0 + jj) * s.hd;
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
      const int d = lane + c * kWarp;
      if (d < hd) {
        dk[off + d] = gk[i][c];
        dv[off + d] = gv[i][c];
      }
    }
  }
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Calls f.template operator()<DPL>() with DPL = ceil(hd / 32).
template <typename F>
void dispatch_dims_per_lane(int64_t hd, F&& f) {
  TORCH_CHECK(hd >= 1 && hd <= 128, "cross_attention (CUDA): head dim must be in 1..128, got ", hd);
  switch ((hd + kWarp - 1) / kWarp) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

Dims dims_of(const CrossAttnShape& c) { return {c.B, c.H, c.Hkv, c.G, c.T, c.V, c.hd, c.G * c.T}; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in,
                                                         const std::optional<at::Tensor>& kv_lens, double scale) {
  const CrossAttnShape cs = check_cross_attention_inputs(q_in, k_in, v_in, kv_lens);
  c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  auto out = at::empty({cs.B, cs.H, cs.T, cs.hd}, q.options());
  auto lse = at::empty({cs.B, cs.H, cs.T}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  const Dims s = dims_of(cs);
  const auto lens = clamped_kv_lens(kv_lens, cs, q.device());
  const int64_t row_blocks = (s.R + kRowsPerBlock - 1) / kRowsPerBlock, base_blocks = row_blocks * s.B * s.Hkv;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t key_tiles = std::max<int64_t>(1, (s.V + kKeys - 1) / kKeys);
  const int64_t splits = base_blocks >= sms ? 1 : std::min(key_tiles, (2 * sms + base_blocks - 1) / base_blocks);
  const int64_t keys_per_split = ((s.V + splits - 1) / splits + kKeys - 1) / kKeys * kKeys;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cross_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor part_o, part_lse;
    if (splits > 1) {
      part_o = at::empty({splits, s.B * s.H * s.T, s.hd}, lse.options());
      part_lse = at::empty({splits, s.B * s.H * s.T}, lse.options());
    }
    const size_t smem = (kKeys * (s.hd + 1) + kKeys * s.hd + kRowsPerBlock * s.hd) * sizeof(acc_t);
    dispatch_dims_per_lane(s.hd, [&](auto dpl) {
      auto kernel = forward_kernel<scalar_t, acc_t, decltype(dpl)::value>;
      allow_shared_memory(kernel, smem);
      kernel<<<dim3(row_blocks, s.B * s.Hkv, splits), kThreads, smem, stream>>>(
          strided<scalar_t>(q), strided<scalar_t>(k), strided<scalar_t>(v), lens.data_ptr<int>(), s,
          static_cast<acc_t>(scale), keys_per_split, out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
          splits > 1 ? part_o.data_ptr<acc_t>() : nullptr, splits > 1 ? part_lse.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (splits > 1) {
      const int64_t n = s.B * s.H * s.T * s.hd;
      combine_kernel<scalar_t, acc_t><<<(n + 255) / 256, 256, 0, stream>>>(
          part_o.data_ptr<acc_t>(), part_lse.data_ptr<acc_t>(), splits, s.B * s.H * s.T, s.hd,
          out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& kv_lens, double scale) {
  const CrossAttnShape cs = check_cross_attention_backward_inputs(grad_out, q_in, k_in, v_in, out, lse, kv_lens);
  c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const auto dout = last_dim_contiguous(grad_out.to(q.scalar_type()));
  const auto acc_type = at::toOpMathType(q.scalar_type());
  auto dq = at::zeros({cs.B, cs.H, cs.T, cs.hd}, q.options().dtype(acc_type));
  auto dk = at::zeros({cs.B, cs.Hkv, cs.V, cs.hd}, q.options().dtype(acc_type));
  auto dv = at::zeros_like(dk);
  if (q.numel() > 0 && k.numel() > 0) {
    const auto delta = backward_delta(dout, out, grad_lse, acc_type);  // (B, H, T)
    const auto lse_a = lse.to(acc_type).contiguous();
    const Dims s = dims_of(cs);
    const auto lens = clamped_kv_lens(kv_lens, cs, q.device());
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cross_attention_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t smem_dq = (2 * kKeys * (s.hd + 1) + 2 * kRowsPerBlock * s.hd) * sizeof(acc_t);
      const size_t smem_kv = (2 * kWarp * (s.hd + 1) + 2 * kRowsPerBlock * s.hd + 2 * kWarp) * sizeof(acc_t);
      dispatch_dims_per_lane(s.hd, [&](auto dpl) {
        constexpr int DPL = decltype(dpl)::value;
        auto dq_kernel = backward_dq_kernel<scalar_t, acc_t, DPL>;
        allow_shared_memory(dq_kernel, smem_dq);
        dq_kernel<<<dim3((s.R + kRowsPerBlock - 1) / kRowsPerBlock, s.B * s.Hkv), kThreads, smem_dq, stream>>>(
            strided<scalar_t>(q), strided<scalar_t>(k), strided<scalar_t>(v), strided<scalar_t>(dout),
            lse_a.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), lens.data_ptr<int>(), s, static_cast<acc_t>(scale),
            dq.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        auto kv_kernel = backward_dkdv_kernel<scalar_t, acc_t, DPL>;
        allow_shared_memory(kv_kernel, smem_kv);
        kv_kernel<<<dim3((s.V + kRowsPerBlock - 1) / kRowsPerBlock, s.B * s.Hkv), kThreads, smem_kv, stream>>>(
            strided<scalar_t>(q), strided<scalar_t>(k), strided<scalar_t>(v), strided<scalar_t>(dout),
            lse_a.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), lens.data_ptr<int>(), s, static_cast<acc_t>(scale),
            dk.data_ptr<acc_t>(), dv.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

}  // namespace visor

TORCH_LIBRARY_IMPL(visor, CUDA, m) {
  m.impl("cross_attention", &visor::cross_attention_cuda);
  m.impl("cross_attention_backward", &visor::cross_attention_backward_cuda);
}
