// Host-side code shared by the CPU registration (bindings.cpp) and the CUDA one
// (cuda/attention_cuda.cpp): argument checks, validated once at the boundary with messages that
// name the argument and its shape (STYLE.md #6, FlashAttention's CHECK_SHAPE / CHECK_DEVICE),
// and the filling of the AttentionParams struct the kernels take (STYLE.md #5).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <string>
#include <tuple>

#include "attention.h"

namespace minigpt {

// The kernels' DType of a torch dtype; false for dtypes no kernel implements.
inline bool to_dtype(at::ScalarType t, DType* out) {
  switch (t) {
    case at::kFloat: *out = DType::Float32; return true;
    case at::kDouble: *out = DType::Float64; return true;
    case at::kBFloat16: *out = DType::BFloat16; return true;
    case at::kHalf: *out = DType::Float16; return true;
    default: return false;
  }
}

// What one device's kernels accept: a device type and its dtype list from attention.h.
struct Accepts {
  c10::DeviceType device;
  const DType* dtypes;
  std::size_t n_dtypes;

  bool dtype_ok(at::ScalarType t) const {
    DType d;
    if (!to_dtype(t, &d)) return false;
    for (std::size_t i = 0; i < n_dtypes; ++i)
      if (dtypes[i] == d) return true;
    return false;
  }
  std::string dtype_names() const {  // for messages, e.g. "float32 or float64"
    std::string s;
    for (std::size_t i = 0; i < n_dtypes; ++i)
      s += std::string(i == 0 ? "" : i + 1 == n_dtypes ? " or " : ", ") + dtype_name(dtypes[i]);
    return s;
  }
};

template <std::size_t N>
Accepts accepts(c10::DeviceType device, const DType (&dtypes)[N]) {
  return Accepts{device, dtypes, N};
}

// A (B, H, T, D) argument: 4-d, on the kernels' device type and q's device, an accepted dtype
// equal to q's, and a unit stride in D.
inline void check_bhtd(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& q, const Accepts& accepts) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-d (B, H, T, D), got shape ", t.sizes());
  TORCH_CHECK(t.device().type() == accepts.device, op, ": ", name, " must be on ",
              c10::DeviceTypeName(accepts.device, /*lower_case=*/true),
              " for this kernel, got ", t.device(), " with shape ", t.sizes());
  TORCH_CHECK(accepts.dtype_ok(t.scalar_type()), op, ": ", name, " must be ",
              accepts.dtype_names(), " on ", c10::DeviceTypeName(accepts.device, true), ", got ",
              t.scalar_type(), " with shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but q has ", q.scalar_type(), " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ",
              q.device(), " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1 || t.numel() == 0, op, ": ", name,
              " must have a contiguous last dimension, got shape ", t.sizes(), " and strides ",
              t.strides());
}

// q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) as docs/design.md's contract requires.
inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, bool causal, const Accepts& accepts) {
  check_bhtd(op, "q", q, q, accepts);
  check_bhtd(op, "k", k, q, accepts);
  check_bhtd(op, "v", v, q, accepts);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got k ", k.sizes(),
              " and v ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op,
              ": k must match q in batch and head dim, got q ", q.sizes(), " and k ", k.sizes());
  // Hq == 0 is rejected here rather than in the kernels: an early return there would hand back
  // uninitialised dk and dv from the backward.
  TORCH_CHECK(q.size(1) > 0, op, ": q must have at least one head, got q ", q.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
              ": q's heads must be a multiple of k's heads (grouped-query attention), got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(!causal || q.size(2) <= k.size(2), op,
              ": causal attention needs Tq <= Tk (queries aligned to the last keys), got q ",
              q.sizes(), " and k ", k.sizes());
}

// The optional score terms: alibi_slopes float32 (Hq,) contiguous on q's device; window >= 0
// (0 = none) and only with causal. has_alibi / has_window: whether this device's kernels
// implement them.
inline void check_terms(const char* op, const at::Tensor& q,
                        const c10::optional<at::Tensor>& alibi_slopes, int64_t window,
                        bool causal, bool has_alibi, bool has_window) {
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& s = *alibi_slopes;
    TORCH_CHECK(has_alibi, op, ": ALiBi (alibi_slopes) is not implemented by the ",
                q.device().type(), " kernels");
    TORCH_CHECK(s.dim() == 1 && s.size(0) == q.size(1), op,
                ": alibi_slopes must have shape (Hq,) = (", q.size(1), ",), got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device() == q.device() && s.is_contiguous(),
                op, ": alibi_slopes must be a contiguous float32 tensor on q's device ",
                q.device(), ", got ", s.scalar_type(), " on ", s.device());
  }
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = no window), got ", window);
  TORCH_CHECK(window == 0 || causal, op, ": window needs causal=True, got window=", window);
  TORCH_CHECK(window == 0 || has_window, op, ": a sliding window is not implemented by the ",
              q.device().type(), " kernels");
}

inline void set_terms(AttentionParams& p, const c10::optional<at::Tensor>& alibi_slopes,
                      int64_t window) {
  p.alibi_slopes = alibi_slopes.has_value() && alibi_slopes->defined()
                       ? alibi_slopes->data_ptr<float>()
                       : nullptr;
  p.window = window;
}

// The backward's extra inputs: dout and out of q's shape, lse (B, Hq, Tq) float32 (any strides:
// the callers make it contiguous).
inline void check_backward_inputs(const char* op, const at::Tensor& dout, const at::Tensor& out,
                                  const at::Tensor& lse, const at::Tensor& q,
                                  const Accepts& accepts) {
  check_bhtd(op, "dout", dout, q, accepts);
  check_bhtd(op, "out", out, q, accepts);
  TORCH_CHECK(dout.sizes() == q.sizes(), op, ": dout must have q's shape ", q.sizes(), ", got ",
              dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape ", q.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              op, ": lse must have shape (B, Hq, Tq) = (", q.size(0), ", ", q.size(1), ", ",
              q.size(2), "), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.device() == q.device(), op,
              ": lse must be a float32 tensor on q's device ", q.device(), ", got ",
              lse.scalar_type(), " on ", lse.device(), " with shape ", lse.sizes());
}

inline Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2)};
}

inline DType dtype_of(const at::Tensor& t) {
  DType d = DType::Float32;
  to_dtype(t.scalar_type(), &d);  // check_bhtd admits only dtypes it knows
  return d;
}

// The forward's outputs, allocated like q: out (q's shape and dtype) and lse (B, Hq, Tq) float32.
inline std::tuple<at::Tensor, at::Tensor> empty_forward_outputs(const at::Tensor& q) {
  return {at::empty(q.sizes(), q.options()),
          at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))};
}

// The backward's outputs: dq, dk, dv with the shapes and dtypes of q, k, v.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_backward_outputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()),
          at::empty(v.sizes(), v.options())};
}

// The forward's part of the struct: sizes, dtype, scale, flags and the q, k, v pointers.
inline AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   bool causal, double scale) {
  AttentionParams p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Tq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Tk = k.size(2);
  p.dtype = dtype_of(q);
  p.scale = static_cast<float>(scale);
  p.scale_fp64 = scale;
  p.causal = causal;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(k);
  p.v_stride = strides_of(v);
  return p;
}

// The backward's part: out and lse from the forward, dout, and the gradients to write.
// lse must be contiguous (B, Hq, Tq).
inline void set_backward_params(AttentionParams& p, const at::Tensor& out, const at::Tensor& lse,
                                const at::Tensor& dout, const at::Tensor& dq,
                                const at::Tensor& dk, const at::Tensor& dv) {
  p.out = const_cast<void*>(out.data_ptr());
  p.out_stride = strides_of(out);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr();
  p.dout_stride = strides_of(dout);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_stride = strides_of(dq);
  p.dk_stride = strides_of(dk);
  p.dv_stride = strides_of(dv);
}

}  // namespace minigpt
