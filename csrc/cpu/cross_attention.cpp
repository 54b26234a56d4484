// CPU kernels of visor::cross_attention (forward with log-sum-exp, and backward).
//
// One pass over the keys with an online softmax (running max m, running sum l, rescaled output
// accumulator). Work items are (batch, kv head, block of up to RB query rows); the rows of an item
// are the G query heads sharing the kv head times the T queries, so k/v are read once per group
// (GQA without expanding them). An item walks the keys in blocks of KB, converted to the
// accumulation type into cache-resident buffers, and does its two products (scores = Q K^T and
// O += P V) with a register-blocked micro-kernel (MR rows x 2 vectors, at::vec FMAs). When items are
// fewer than the threads (decoding: T = 1), each is also split over key ranges and the partial results
// are merged through their log-sum-exp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../cross_attention.h"

namespace visor {
namespace {

// Accumulation type `acc_t`: float for float/half/bfloat16 inputs, double for double (gradcheck).
constexpr int64_t KB = 64;  // keys per block
constexpr int64_t RB = 32;  // query rows per item
template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

template <typename acc_t>
constexpr int64_t kNR = 2 * at::vec::Vectorized<acc_t>::size();  // micro-kernel width (columns)
static_assert(KB % (2 * at::vec::Vectorized<float>::size()) == 0, "KB must be a multiple of the micro-kernel width");
static_assert(RB % (2 * at::vec::Vectorized<float>::size()) == 0, "RB must be a multiple of the micro-kernel width");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[0:MR, 0:NR] (+)= A[0:MR, 0:K] B[0:K, 0:NR]; A[i][k] at A[i * lda + k * ak] (ak = 1: row-major,
// lda = 1: A given transposed), B and C row-major; accumulators in registers.
template <typename acc_t, int MR>
inline void micro_kernel(int64_t K, const acc_t* A, int64_t lda, int64_t ak, const acc_t* B, int64_t ldb, acc_t* C,
                         int64_t ldc, bool accumulate) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) {
    c0[i] = accumulate ? Vec::loadu(C + i * ldc) : Vec(acc_t(0));
    c1[i] = accumulate ? Vec::loadu(C + i * ldc + W) : Vec(acc_t(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vec b0 = Vec::loadu(B + k * ldb), b1 = Vec::loadu(B + k * ldb + W);
    for (int i = 0; i < MR; ++i) {
      const Vec a(A[i * lda + k * ak]);
      c0[i] = at::vec::fmadd(a, b0, c0[i]);
      c1[i] = at::vec::fmadd(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    c0[i].store(C + i * ldc);
    c1[i].store(C + i * ldc + W);
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// The float micro-kernel with AVX2 intrinsics and one named register per accumulator: GCC keeps an
// array of at::vec accumulators in memory as well, storing all of them on every step (measured: the
// loop is then store-bound, about half speed).
#define VISOR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
template <int MR>
inline void micro_kernel_avx2(int64_t K, const float* A, int64_t lda, int64_t ak, const float* B, int64_t ldb, float* C,
                              int64_t ldc, bool accumulate) {
#define VISOR_DECL(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
  VISOR_ROWS(VISOR_DECL)
#undef VISOR_DECL
  if (accumulate) {
#define VISOR_LOAD(i)                             \
  if constexpr (MR > i) {                         \
    c##i##0 = _mm256_loadu_ps(C + i * ldc);       \
    c##i##1 = _mm256_loadu_ps(C + i * ldc + 8);   \
  }
    VISOR_ROWS(VISOR_LOAD)
#undef VISOR_LOAD
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
#define VISOR_STEP(i)                                         \
  if constexpr (MR > i) {                                     \
    const __m256 a = _mm256_broadcast_ss(A + i * lda + k * ak); \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                \
    c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                \
  }
    VISOR_ROWS(VISOR_STEP)
#undef VISOR_STEP
  }
#define VISOR_STORE(i)                           \
  if constexpr (MR > i) {                        \
    _mm256_storeu_ps(C + i * ldc, c##i##0);      \
    _mm256_storeu_ps(C + i * ldc + 8, c##i##1);  \
  }
  VISOR_ROWS(VISOR_STORE)
#undef VISOR_STORE
}
#undef VISOR_ROWS
#endif

template <typename acc_t, int MR>
inline void micro(int64_t K, const acc_t* A, int64_t lda, int64_t ak, const acc_t* B, int64_t ldb, acc_t* C,
                  int64_t ldc, bool accumulate) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same<acc_t, float>::value) {
    micro_kernel_avx2<MR>(K, A, lda, ak, B, ldb, C, ldc, accumulate);
    return;
  }
#endif
  micro_kernel<acc_t, MR>(K, A, lda, ak, B, ldb, C, ldc, accumulate);
}

// C[M, N] (+)= A[M, K] B[K, N], N a multiple of kNR<acc_t>; A[i][k] at A[i * lda + k * ak].
template <typename acc_t>
void gemm(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, int64_t ak, const acc_t* B, int64_t ldb,
          acc_t* C, int64_t ldc, bool accumulate) {
  constexpr int64_t MR = 6;
  for (int64_t i = 0; i < M; i += MR) {
    const int64_t mr = std::min(MR, M - i);
    for (int64_t j = 0; j < N; j += kNR<acc_t>) {
      const acc_t* a = A + i * lda;
      const acc_t* b = B + j;
      acc_t* c = C + i * ldc + j;
      switch (mr) {
        case 6: micro<acc_t, 6>(K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        case 5: micro<acc_t, 5>(K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        case 4: micro<acc_t, 4>(K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        case 3: micro<acc_t, 3>(K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        case 2: micro<acc_t, 2>(K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
        default: micro<acc_t, 1>(K, a, lda, ak, b, ldb, c, ldc, accumulate); break;
      }
    }
  }
}

template <typename acc_t>
inline void scale(acc_t a, acc_t* y, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec(a) * Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] *= a;
}

// p[0:n] = exp(p[0:n] - shift[0:n]); sum[0:n] += p[0:n] unless sum is null. n a multiple of the width.
inline void exp_shifted_add(float* p, const float* shift, float* sum, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const Vec e = (Vec::loadu(p + i) - Vec::loadu(shift + i)).exp_u20();
    e.store(p + i);
    if (sum) (Vec::loadu(sum + i) + e).store(sum + i);
  }
}
inline void exp_shifted_add(double* p, const double* shift, double* sum, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    p[i] = std::exp(p[i] - shift[i]);
    if (sum) sum[i] += p[i];
  }
}

// Strided view of a (B, heads, S, hd) tensor whose last dim is contiguous.
template <typename scalar_t>
struct Rows {
  const scalar_t* p;
  int64_t sb, sh, ss;
  explicit Rows(const at::Tensor& t) : p(t.data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  const scalar_t* at(int64_t b, int64_t h, int64_t s) const { return p + b * sb + h * sh + s * ss; }
};

// Rows of a (b, kv head) problem, in acc_t times `mult`, into a zeroed (n_pad, ld) buffer `rows` and/or
// its transpose (hd, ldt). For keys, `first` is a key index and h = the kv head; for queries (heads !=
// nullptr) row r is head hk * G + r / T, query r % T.
template <typename scalar_t, typename acc_t>
void load(const Rows<scalar_t>& src, const CrossAttnShape& s, bool query_rows, int64_t b, int64_t hk, int64_t first,
          int64_t n, int64_t n_pad, acc_t mult, acc_t* rows, int64_t ld, acc_t* cols, int64_t ldt) {
  if (rows) std::fill(rows, rows + n_pad * ld, acc_t(0));
  if (cols) std::fill(cols, cols + s.hd * ldt, acc_t(0));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = first + i;
    const scalar_t* x = query_rows ? src.at(b, hk * s.G + r / s.T, r % s.T) : src.at(b, hk, r);
    for (int64_t d = 0; d < s.hd; ++d) {
      const acc_t f = mult * static_cast<acc_t>(x[d]);
      if (rows) rows[i * ld + d] = f;
      if (cols) cols[d * ldt + i] = f;
    }
  }
}

inline int64_t row_offset(const CrossAttnShape& s, int64_t b, int64_t hk, int64_t r) {  // into (B, H, T)
  return (b * s.H + hk * s.G + r / s.T) * s.T + r % s.T;
}

// Online-softmax attention of rows [r0, r1) of (b, hk) over keys [j0, j1): the normalised output
// (n_rows, hdp) and the log-sum-exp per row. No key -> output 0, lse -inf.
// Scores are computed transposed, S^T = K (sc Q)^T (n keys, RBp rows): the queries are transposed once
// per item, float32 keys and values are read in place, and the softmax statistics of all rows are
// vectors updated key by key.
template <typename scalar_t, typename acc_t>
struct Attend {
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();
  const CrossAttnShape& s;
  int64_t hdp;
  bool k_direct, v_direct;  // read k / v in place (same type, and for v a width-multiple head dim)
  std::vector<acc_t> qc, kr, vr, St, m, l, mx, corr;

  explicit Attend(const CrossAttnShape& shape) : s(shape), hdp(round_up(shape.hd, kNR<acc_t>)) {
    k_direct = std::is_same<scalar_t, acc_t>::value;
    v_direct = k_direct && hdp == s.hd;
    qc.resize(s.hd * RB), kr.resize(KB * s.hd), vr.resize(KB * hdp), St.resize(KB * RB);
    m.resize(RB), l.resize(RB), mx.resize(RB), corr.resize(RB);
  }

  void run(const Rows<scalar_t>& q, const Rows<scalar_t>& k, const Rows<scalar_t>& v, int64_t b, int64_t hk,
           int64_t r0, int64_t r1, int64_t j0, int64_t j1, acc_t sc, acc_t* o, acc_t* lse) {
    const int64_t n_rows = r1 - r0, hd = s.hd, RBp = round_up(n_rows, kNR<acc_t>);
    std::fill(m.begin(), m.end(), kNegInf<acc_t>);
    std::fill(l.begin(), l.end(), acc_t(0));
    std::fill(o, o + n_rows * hdp, acc_t(0));
    load(q, s, true, b, hk, r0, n_rows, n_rows, sc, (acc_t*)nullptr, 0, qc.data(), RBp);
    for (int64_t jb = j0; jb < j1; jb += KB) {
      const int64_t n = std::min(KB, j1 - jb);
      const acc_t *kp = kr.data(), *vp = vr.data();
      int64_t ldk = hd, ldv = hdp;
      if (k_direct) {
        kp = reinterpret_cast<const acc_t*>(k.at(b, hk, jb)), ldk = k.ss;
      } else {
        load(k, s, false, b, hk, jb, n, n, acc_t(1), kr.data(), hd, (acc_t*)nullptr, 0);
      }
      if (v_direct) {
        vp = reinterpret_cast<const acc_t*>(v.at(b, hk, jb)), ldv = v.ss;
      } else {
        load(v, s, false, b, hk, jb, n, n, acc_t(1), vr.data(), hdp, (acc_t*)nullptr, 0);
      }
      gemm(n, RBp, hd, kp, ldk, 1, qc.data(), RBp, St.data(), RBp, false);  // S^T (n, RBp)
      std::copy(m.begin(), m.begin() + RBp, mx.begin());
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t c = 0; c < RBp; c += W) {
          at::vec::maximum(Vec::loadu(mx.data() + c), Vec::loadu(St.data() + j * RBp + c)).store(mx.data() + c);
        }
      }
      for (int64_t r = 0; r < RBp; ++r) {
        corr[r] = std::exp(m[r] - mx[r]);  // m = -inf on the first block: 0
        l[r] *= corr[r];
        m[r] = mx[r];
      }
      for (int64_t j = 0; j < n; ++j) exp_shifted_add(St.data() + j * RBp, mx.data(), l.data(), RBp);
      for (int64_t r = 0; r < n_rows; ++r) scale(corr[r], o + r * hdp, hdp);
      gemm(n_rows, hdp, n, St.data(), 1, RBp, vp, ldv, o, hdp, true);  // O += P V, P = (S^T)^T
    }
    for (int64_t r = 0; r < n_rows; ++r) {
      if (l[r] > 0) {
        scale(acc_t(1) / l[r], o + r * hdp, hdp);
        lse[r] = m[r] + std::log(l[r]);
      } else {
        lse[r] = kNegInf<acc_t>;
      }
    }
  }
};

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int* lens,
                  const CrossAttnShape& s, double scale_, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sc = static_cast<acc_t>(scale_);
  const Rows<scalar_t> Q(q), K(k), Vr(v);
  const int64_t R = s.G * s.T, hd = s.hd, hdp = round_up(hd, kNR<acc_t>);
  const int64_t n_rb = (R + RB - 1) / RB, n_items = s.B * s.Hkv * n_rb;
  const int64_t threads = at::get_num_threads();
  const int64_t max_splits = std::max<int64_t>(1, (s.V + KB - 1) / KB);
  const int64_t splits = n_items >= threads ? 1 : std::min(max_splits, (2 * threads + n_items - 1) / n_items);
  const int64_t keys_per_split = round_up((s.V + splits - 1) / splits, KB);
  scalar_t* outp = out.data_ptr<scalar_t>();
  acc_t* lsep = lse.data_ptr<acc_t>();
  const int64_t n_rows_all = s.B * s.H * s.T;
  // Partial results of every split: (splits, B * H * T, hd) and (splits, B * H * T), merged below.
  std::vector<acc_t> part_o(splits > 1 ? splits * n_rows_all * hd : 0), part_lse(splits > 1 ? splits * n_rows_all : 0);

  at::parallel_for(0, n_items * splits, 1, [&](int64_t begin, int64_t end) {
    Attend<scalar_t, acc_t> attend(s);
    std::vector<acc_t> o(RB * hdp), l(RB);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % splits, w = item / splits;
      const int64_t rb = w % n_rb, bh = w / n_rb, hk = bh % s.Hkv, b = bh / s.Hkv;
      const int64_t r0 = rb * RB, r1 = std::min(R, r0 + RB), L = lens[b];
      const int64_t j0 = std::min(L, split * keys_per_split), j1 = std::min(L, j0 + keys_per_split);
      attend.run(Q, K, Vr, b, hk, r0, r1, j0, j1, sc, o.data(), l.data());
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = row_offset(s, b, hk, r);
        const acc_t* src = o.data() + (r - r0) * hdp;
        if (splits == 1) {
          for (int64_t d = 0; d < hd; ++d) outp[row * hd + d] = static_cast<scalar_t>(src[d]);
          lsep[row] = l[r - r0];
        } else {
          std::copy(src, src + hd, part_o.data() + (split * n_rows_all + row) * hd);
          part_lse[split * n_rows_all + row] = l[r - r0];
        }
      }
    }
  });
  if (splits == 1) return;
  at::parallel_for(0, n_rows_all, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(hd);
    for (int64_t row = begin; row < end; ++row) {
      acc_t mx = kNegInf<acc_t>;
      for (int64_t sp = 0; sp < splits; ++sp) mx = std::max(mx, part_lse[sp * n_rows_all + row]);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t total = 0;
      if (mx != kNegInf<acc_t>) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const acc_t w = std::exp(part_lse[sp * n_rows_all + row] - mx);
          const acc_t* po = part_o.data() + (sp * n_rows_all + row) * hd;
          total += w;
          for (int64_t d = 0; d < hd; ++d) acc[d] += w * po[d];
        }
      }
      for (int64_t d = 0; d < hd; ++d) outp[row * hd + d] = static_cast<scalar_t>(total > 0 ? acc[d] / total : acc_t(0));
      lsep[row] = total > 0 ? mx + std::log(total) : kNegInf<acc_t>;
    }
  });
}

// Backward. With P = softmax(S), S = sc * Q K^T, dP = dO V^T and Delta = rowsum(dO * O) - dlse:
// dS = P * (dP - Delta), dQ = sc * dS K, dK = sc * dS^T Q, dV = P^T dO.
// First, per (b, kv head), the rows' sc * Q and dO are laid out once, row-major and transposed.
// Then items (b, kv head, key block) walk all rows in blocks: S^T = K (sc Q)^T and dP^T = V dO^T,
// then dV and dK of the item's keys (no other item writes them) and dQ into a per-thread partial
// sum, reduced at the end (so S and dP are computed once, not once for dQ and again for dK, dV).
template <typename scalar_t>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& lse, const at::Tensor& delta, const int* lens, const CrossAttnShape& s,
                   double scale_, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sc = static_cast<acc_t>(scale_);
  const Rows<scalar_t> Q(q), K(k), Vr(v), dO(dout);
  const acc_t* lsep = lse.data_ptr<acc_t>();
  const acc_t* deltap = delta.data_ptr<acc_t>();
  const int64_t R = s.G * s.T, hd = s.hd, hdp = round_up(hd, kNR<acc_t>), Rp = round_up(R, RB);
  const int64_t n_bh = s.B * s.Hkv, n_kb = (s.V + KB - 1) / KB;
  const bool kv_direct = std::is_same<scalar_t, acc_t>::value && hdp == hd;

  // (n_bh, Rp, hdp) row-major and (n_bh, hd, Rp) transposed; rows past R are zero.
  std::vector<acc_t> q_rows(n_bh * Rp * hdp), q_cols(n_bh * hd * Rp), do_rows(n_bh * Rp * hdp), do_cols(n_bh * hd * Rp);
  at::parallel_for(0, n_bh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.Hkv, hk = bh % s.Hkv;
      load(Q, s, true, b, hk, 0, R, Rp, sc, q_rows.data() + bh * Rp * hdp, hdp, q_cols.data() + bh * hd * Rp, Rp);
      load(dO, s, true, b, hk, 0, R, Rp, acc_t(1), do_rows.data() + bh * Rp * hdp, hdp, do_cols.data() + bh * hd * Rp,
           Rp);
    }
  });
  const int64_t n_threads = at::get_num_threads();
  std::vector<acc_t> dq_part(n_threads * n_bh * Rp * hdp, acc_t(0));  // per-thread partial sums of dS K

  at::parallel_for(0, n_bh * n_kb, 1, [&](int64_t begin, int64_t end) {
    acc_t* dq_mine = dq_part.data() + at::get_thread_num() * n_bh * Rp * hdp;
    std::vector<acc_t> kr(KB * hdp), vr(KB * hdp), St(KB * RB), dPt(KB * RB), gk(KB * hdp), gv(KB * hdp), lse_r(RB),
        delta_r(RB);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kb = item % n_kb, bh = item / n_kb, hk = bh % s.Hkv, b = bh / s.Hkv;
      const int64_t jb = kb * KB, n = std::min(KB, std::max<int64_t>(0, lens[b] - jb));
      if (n == 0) continue;  // keys past kv_lens: zero gradient (dk, dv start at zero)
      const acc_t *kp = kr.data(), *vp = vr.data();
      int64_t ldk = hdp, ldv = hdp;
      if (kv_direct) {
        kp = reinterpret_cast<const acc_t*>(K.at(b, hk, jb)), ldk = K.ss;
        vp = reinterpret_cast<const acc_t*>(Vr.at(b, hk, jb)), ldv = Vr.ss;
      } else {
        load(K, s, false, b, hk, jb, n, n, acc_t(1), kr.data(), hdp, (acc_t*)nullptr, 0);
        load(Vr, s, false, b, hk, jb, n, n, acc_t(1), vr.data(), hdp, (acc_t*)nullptr, 0);
      }
      std::fill(gk.begin(), gk.end(), acc_t(0));
      std::fill(gv.begin(), gv.end(), acc_t(0));
      const int64_t row_base = (b * s.H + hk * s.G) * s.T;  // rows of (b, hk) are contiguous in (B, H, T)
      for (int64_t r0 = 0; r0 < R; r0 += RB) {
        const int64_t nr = std::min(RB, R - r0);
        for (int64_t r = 0; r < RB; ++r) {
          lse_r[r] = r < nr ? lsep[row_base + r0 + r] : acc_t(0);
          delta_r[r] = r < nr ? deltap[row_base + r0 + r] : acc_t(0);
        }
        const acc_t* qc = q_cols.data() + bh * hd * Rp + r0;
        const acc_t* dc = do_cols.data() + bh * hd * Rp + r0;
        gemm(n, RB, hd, kp, ldk, 1, qc, Rp, St.data(), RB, false);   // S^T (n, RB)
        gemm(n, RB, hd, vp, ldv, 1, dc, Rp, dPt.data(), RB, false);  // dP^T
        for (int64_t j = 0; j < n; ++j) {
          acc_t* p = St.data() + j * RB;
          acc_t* ds = dPt.data() + j * RB;
          exp_shifted_add(p, lse_r.data(), (acc_t*)nullptr, RB);
          for (int64_t r = 0; r < RB; ++r) {
            const bool valid = r < nr;
            ds[r] = valid ? p[r] * (ds[r] - delta_r[r]) : acc_t(0);
            p[r] = valid ? p[r] : acc_t(0);
          }
        }
        gemm(n, hdp, RB, St.data(), RB, 1, do_rows.data() + (bh * Rp + r0) * hdp, hdp, gv.data(), hdp, true);  // dV
        gemm(n, hdp, RB, dPt.data(), RB, 1, q_rows.data() + (bh * Rp + r0) * hdp, hdp, gk.data(), hdp, true);  // dK
        gemm(nr, hdp, n, dPt.data(), 1, RB, kp, ldk, dq_mine + (bh * Rp + r0) * hdp, hdp, true);  // dQ += dS K
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t off = ((b * s.Hkv + hk) * s.V + jb + j) * hd;
        std::copy(gk.data() + j * hdp, gk.data() + j * hdp + hd, dk.data_ptr<acc_t>() + off);
        std::copy(gv.data() + j * hdp, gv.data() + j * hdp + hd, dv.data_ptr<acc_t>() + off);
      }
    }
  });

  acc_t* dqp = dq.data_ptr<acc_t>();
  at::parallel_for(0, n_bh * R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / R, r = i % R, b = bh / s.Hkv, hk = bh % s.Hkv;
      acc_t* dst = dqp + row_offset(s, b, hk, r) * hd;
      for (int64_t d = 0; d < hd; ++d) {
        acc_t sum = 0;
        for (int64_t t = 0; t < n_threads; ++t) sum += dq_part[((t * n_bh + bh) * Rp + r) * hdp + d];
        dst[d] = sc * sum;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in,
                                                        const std::optional<at::Tensor>& kv_lens, double scale) {
  const CrossAttnShape s = check_cross_attention_inputs(q_in, k_in, v_in, kv_lens);
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  auto out = at::empty({s.B, s.H, s.T, s.hd}, q.options());
  auto lse = at::empty({s.B, s.H, s.T}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  const auto lens = clamped_kv_lens(kv_lens, s, q.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cross_attention_cpu", [&] {
    forward_impl<scalar_t>(q, k, v, lens.data_ptr<int>(), s, scale, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& kv_lens, double scale) {
  const CrossAttnShape s = check_cross_attention_backward_inputs(grad_out, q_in, k_in, v_in, out, lse, kv_lens);
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const auto dout = last_dim_contiguous(grad_out.to(q.scalar_type()));
  const auto acc_type = at::toOpMathType(q.scalar_type());
  auto fopts = q.options().dtype(acc_type);
  auto dq = at::zeros({s.B, s.H, s.T, s.hd}, fopts);
  auto dk = at::zeros({s.B, s.Hkv, s.V, s.hd}, fopts);
  auto dv = at::zeros({s.B, s.Hkv, s.V, s.hd}, fopts);
  if (q.numel() > 0 && k.numel() > 0) {
    const auto delta = backward_delta(dout, out, grad_lse, acc_type);  // (B, H, T)
    const auto lse_a = lse.to(acc_type).contiguous();
    const auto lens = clamped_kv_lens(kv_lens, s, q.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cross_attention_backward_cpu", [&] {
      backward_impl<scalar_t>(dout, q, k, v, lse_a, delta, lens.data_ptr<int>(), s, scale, dq, dk, dv);
    });
  }
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

}  // namespace visor

TORCH_LIBRARY_IMPL(visor, CPU, m) {
  m.impl("cross_attention", &visor::cross_attention_cpu);
  m.impl("cross_attention_backward", &visor::cross_attention_backward_cpu);
}
