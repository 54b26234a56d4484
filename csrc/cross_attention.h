// visor::cross_attention: text queries over visual keys/values (no mask), shared by the CPU and CUDA
// kernels: input checks, the output-shape contract and the index arithmetic of grouped-query rows.
//
//   q (B, H, T, hd), k, v (B, Hkv, V, hd), H % Hkv == 0, kv_lens (B,) integer or None, scale float
//   -> out (B, H, T, hd) in q's dtype, lse (B, H, T) = log sum_j exp(scale * q . k_j) in the
//      accumulation type (float32; float64 for float64 inputs)
//
// Grouped-query attention without expanding k/v: the G = H / Hkv query heads that share a kv head
// are handled together as R = G * T "rows" of one (b, kv head) problem; row r is head
// hkv * G + r / T, query r % T.
// kv_lens[b] valid keys (values are clamped to [0, V]); a sample with no valid key gets out = 0 and
// lse = -inf, and zero gradients.
// Inputs may be any strided views whose last dim is contiguous; others are copied once.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace visor {

struct CrossAttnShape {
  int64_t B, H, Hkv, G, T, V, hd;
};

inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

inline CrossAttnShape check_cross_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& kv_lens) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "cross_attention: q (B, H, T, hd), k and v (B, Hkv, V, hd) expected, got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "cross_attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "cross_attention: q ", q.sizes(), " and k ",
              k.sizes(), " differ in batch or head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "cross_attention: query heads ", q.size(1),
              " not a multiple of kv heads ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "cross_attention: q, k, v dtypes differ");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "cross_attention: floating-point inputs expected");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "cross_attention: tensors on different devices");
  if (kv_lens.has_value()) {
    const auto& l = *kv_lens;
    TORCH_CHECK(l.dim() == 1 && l.size(0) == q.size(0), "cross_attention: kv_lens must be (B,) = (", q.size(0),
                ",), got ", l.sizes());
    TORCH_CHECK(!at::isFloatingType(l.scalar_type()) && l.scalar_type() != at::kBool,
                "cross_attention: kv_lens must be an integer tensor");
    TORCH_CHECK(l.device() == q.device(), "cross_attention: kv_lens on ", l.device(), ", q on ", q.device());
  }
  const int64_t H = q.size(1), Hkv = k.size(1);
  return {q.size(0), H, Hkv, H / Hkv, q.size(2), k.size(2), q.size(3)};
}

// The backward's extra inputs: grad_out and out shaped like q, lse (B, H, T).
inline CrossAttnShape check_cross_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            const std::optional<at::Tensor>& kv_lens) {
  const CrossAttnShape s = check_cross_attention_inputs(q, k, v, kv_lens);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == q.sizes(),
              "cross_attention_backward: grad_out and out must be shaped like q");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.B, s.H, s.T}), "cross_attention_backward: lse must be (B, H, T)");
  return s;
}

// Delta = rowsum(dO * O) - dlse (B, H, T), contiguous in `acc_type`: with it, dS = P * (dP - Delta).
inline at::Tensor backward_delta(const at::Tensor& dout, const at::Tensor& out,
                                 const std::optional<at::Tensor>& grad_lse, at::ScalarType acc_type) {
  auto delta = (dout.to(acc_type) * out.to(acc_type)).sum(-1);
  if (grad_lse.has_value()) delta = delta - grad_lse->to(acc_type);
  return delta.contiguous();
}

// Valid key count per sample, clamped to [0, V], as int32 on the inputs' device.
inline at::Tensor clamped_kv_lens(const std::optional<at::Tensor>& kv_lens, const CrossAttnShape& s,
                                  const at::Device& device) {
  if (!kv_lens.has_value()) return at::full({s.B}, s.V, at::TensorOptions().dtype(at::kInt).device(device));
  return kv_lens->clamp(0, s.V).to(at::kInt).contiguous();
}

}  // namespace visor
