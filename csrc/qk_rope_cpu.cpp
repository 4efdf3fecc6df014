// minigpt: QK-norm and RoPE of the queries and keys in one pass, forward and backward, on the CPU.
//
// What CausalSelfAttention.qkv does to c_attn's output, fused: the output's query, key and value
// heads become three tensors in the dtype attention computes in on the CPU (float32, or bfloat16
// where the bf16 attention kernels run under autocast), and per query
// or key head vector x (head_dim values) at position t,
//   n = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps)       (RMSNorm, Zhang & Sennrich 2019;
//   y = n * gain                                         QK-norm, Henry et al. 2020)
//   out[2i] = y[2i] cos(a) - y[2i+1] sin(a),             (RoPE, Su et al. 2021, eq. 34, pairs
//   out[2i+1] = y[2i] sin(a) + y[2i+1] cos(a)            (x[2i], x[2i+1]), a = t * inv_freq[i])
// With norm=false only the rotation; the values are copied. c_attn's output may be float32 or,
// under CPU autocast, bfloat16 or float16: it is read in its own dtype and computed in float32,
// so the cast to float32 costs no pass of its own, and the backward writes the gradient of
// c_attn's output in that dtype, whole, so that no concatenation of the heads' gradients and
// no cast back follow it. The arithmetic is float32 throughout; a bfloat16 output is rounded
// once, at the store, and bfloat16 gradients are read as they come. The unfused PyTorch code
// computes the same values in several passes over memory, each with its own autograd node; on two
// CPU cores the norm alone was about 15% of a training step of the default model.
//
// Backward, given dout: dy = the rotation by -a of dout; dgain += dy * n over every vector of the
// head kind; dn = dy * gain; dx = rstd * (dn - n * mean(dn * n)). The values' gradient is copied.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"

namespace minigpt {
namespace {

#include "cpu/row_reductions.h"

bool readable_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_inputs(const char* op, const at::Tensor& x, int64_t n_q, int64_t n_k,
                  int64_t head_dim, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && readable_dtype(x.scalar_type()) && x.dim() == 3, op,
              ": qkv must be a (B, T, width) float32, bfloat16 or float16 CPU tensor, got ",
              x.scalar_type(), " ", x.sizes(), " on ", x.device());
  TORCH_CHECK(x.stride(2) == 1, op, ": qkv's last dimension must be contiguous");
  TORCH_CHECK(n_q > 0 && n_k > 0 && head_dim > 0 && head_dim % 2 == 0 &&
                  (n_q + 2 * n_k) * head_dim == x.size(2),
              op, ": n_q + 2 n_k heads of head_dim (even) must make qkv's width ", x.size(2),
              ", got n_q ", n_q, ", n_k ", n_k, ", head_dim ", head_dim);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == x.size(1) && t->size(1) == head_dim / 2,
                op, ": cos and sin must be contiguous float32 (T, head_dim / 2) = (", x.size(1),
                ", ", head_dim / 2, "), got ", t->sizes());
  }
}

const float* gain_ptr(const c10::optional<at::Tensor>& g, int64_t head_dim, const char* op) {
  if (!g.has_value()) return nullptr;
  TORCH_CHECK(g->scalar_type() == at::kFloat && g->is_contiguous() && g->numel() == head_dim,
              op, ": gains must be contiguous float32 (head_dim,)");
  return g->data_ptr<float>();
}

// What the forward and the backward read: checked shapes, the angles and the gains.
struct Operands {
  int64_t B, T, n_q, n_k, D, P, sb, st;  // sizes; qkv's batch and time strides (in elements)
  const float *c, *s, *gq, *gk;
};

Operands operands(const char* op, const at::Tensor& qkv, int64_t n_q, int64_t n_k,
                  int64_t head_dim, const c10::optional<at::Tensor>& q_gain,
                  const c10::optional<at::Tensor>& k_gain, const at::Tensor& cos,
                  const at::Tensor& sin) {
  check_inputs(op, qkv, n_q, n_k, head_dim, cos, sin);
  return {qkv.size(0), qkv.size(1), n_q, n_k, head_dim, head_dim / 2, qkv.stride(0),
          qkv.stride(1), cos.data_ptr<float>(), sin.data_ptr<float>(),
          gain_ptr(q_gain, head_dim, op), gain_ptr(k_gain, head_dim, op)};
}

// Calls f(T{}) with T the C++ type of qkv's dtype (float, at::BFloat16 or at::Half).
template <typename F>
void with_qkv_type(at::ScalarType t, F&& f) {
  if (t == at::kBFloat16) {
    f(at::BFloat16{});
  } else if (t == at::kHalf) {
    f(at::Half{});
  } else {
    f(float{});
  }
}

// float to an element type: bfloat16 rounded to nearest even (NaN kept a quiet NaN) by integer
// arithmetic the compiler vectorises, where c10's conversion stays scalar; others as cast.
template <typename T>
inline T to_elem(float f) {
  return static_cast<T>(f);
}
template <>
inline at::BFloat16 to_elem<at::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return at::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), at::BFloat16::from_bits());
}

template <typename T, typename O>
void forward_rows(const Operands& a, const T* x, O* q, O* k, O* v, float* rs, float eps,
                  bool norm) {
  const int64_t T_ = a.T, H = a.n_q + a.n_k, D = a.D, P = a.P;
  at::parallel_for(0, a.B * T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(D), y(D);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T_, t = bt % T_;
      const T* xr = x + b * a.sb + t * a.st;
      const float* ct = a.c + t * P;
      const float* sn = a.s + t * P;
      for (int64_t h = 0; h < H; ++h) {
        const bool is_q = h < a.n_q;
        const T* xh = xr + h * D;
        O* o = is_q ? q + (bt * a.n_q + h) * D : k + (bt * a.n_k + h - a.n_q) * D;
        const float* g = is_q ? a.gq : a.gk;
        for (int64_t d = 0; d < D; ++d) xf[d] = static_cast<float>(xh[d]);
        float r = 1.f;
        if (norm) {
          r = 1.f / std::sqrt(dot_lanes(xf.data(), xf.data(), D) / static_cast<float>(D) + eps);
          rs[bt * H + h] = r;
        }
        if (g) {
          for (int64_t d = 0; d < D; ++d) y[d] = xf[d] * r * g[d];
        } else {
          for (int64_t d = 0; d < D; ++d) y[d] = xf[d] * r;
        }
        for (int64_t i = 0; i < P; ++i) {
          const float ya = y[2 * i], yb = y[2 * i + 1];
          o[2 * i] = to_elem<O>(ya * ct[i] - yb * sn[i]);
          o[2 * i + 1] = to_elem<O>(ya * sn[i] + yb * ct[i]);
        }
      }
      const T* xv = xr + H * D;  // the values: cast
      O* vo = v + bt * a.n_k * D;
      for (int64_t d = 0; d < a.n_k * D; ++d) vo[d] = to_elem<O>(static_cast<float>(xv[d]));
    }
  });
}

#include "cpu/qk_rope_avx512.h"

// q (B, T, n_q, head_dim), k and v (B, T, n_k, head_dim), in out_dtype (float32 or bfloat16;
// default float32); rstd (B, T, n_q + n_k) float32 (empty without norm).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qkv_norm_rope_forward(
    const at::Tensor& qkv, int64_t n_q, int64_t n_k, int64_t head_dim,
    const c10::optional<at::Tensor>& q_gain, const c10::optional<at::Tensor>& k_gain,
    const at::Tensor& cos, const at::Tensor& sin, double eps, bool norm,
    c10::optional<at::ScalarType> out_dtype) {
  const char* op = "minigpt::qkv_norm_rope_forward";
  const Operands a = operands(op, qkv, n_q, n_k, head_dim, q_gain, k_gain, cos, sin);
  const at::ScalarType out = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(out == at::kFloat || out == at::kBFloat16, op,
              ": out_dtype must be float32 or bfloat16, got ", out);
  const auto f32 = qkv.options().dtype(at::kFloat);
  const auto o = qkv.options().dtype(out);
  at::Tensor q = at::empty({a.B, a.T, n_q, head_dim}, o);
  at::Tensor k = at::empty({a.B, a.T, n_k, head_dim}, o);
  at::Tensor v = at::empty({a.B, a.T, n_k, head_dim}, o);
  at::Tensor rstd = norm ? at::empty({a.B, a.T, n_q + n_k}, f32) : at::empty({0}, f32);
  with_qkv_type(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(qkv.data_ptr());
    float* rs = norm ? rstd.data_ptr<float>() : nullptr;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
#ifdef MINIGPT_HAVE_QK_AVX512
      if (out == at::kBFloat16 && qk_rope_avx512_enabled()) {
        auto u16 = [](const at::Tensor& t) { return static_cast<uint16_t*>(t.data_ptr()); };
        qk512::forward_rows(a, reinterpret_cast<const uint16_t*>(x), u16(q), u16(k), u16(v), rs,
                            static_cast<float>(eps), norm);
        return;
      }
#endif
    }
    if (out == at::kBFloat16) {
      forward_rows<T, at::BFloat16>(a, x, q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(),
                                    v.data_ptr<at::BFloat16>(), rs, static_cast<float>(eps), norm);
    } else {
      forward_rows<T, float>(a, x, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                             rs, static_cast<float>(eps), norm);
    }
  });
  return {q, k, v, rstd};
}

// A gradient of one of the forward's outputs: float32 or bfloat16 (G), (B, T, heads, head_dim),
// any strides with the last dimension contiguous (attention's gradients arrive transposed).
template <typename G>
struct GradView {
  const G* p;
  int64_t sb, st, sh;
};

template <typename G>
GradView<G> grad_view(const char* op, const char* name, const at::Tensor& g, int64_t B,
                      int64_t T, int64_t heads, int64_t D) {
  TORCH_CHECK(g.device().is_cpu() && g.sizes() == at::IntArrayRef({B, T, heads, D}) &&
                  g.stride(3) == 1,
              op, ": ", name, " must be (", B, ", ", T, ", ", heads, ", ", D,
              ") with its last dimension contiguous, got ", g.sizes());
  return {static_cast<const G*>(g.data_ptr()), g.stride(0), g.stride(1), g.stride(2)};
}

// dgain holds `workers` partial sums of (dq_gain, dk_gain), 2 * D floats each.
template <typename T, typename G>
void backward_rows(const Operands& a, const T* x, const GradView<G>& gq_,
                   const GradView<G>& gk_, const GradView<G>& gv_, const float* rs, T* dx,
                   std::vector<float>& dgain, int64_t workers, bool norm) {
  const int64_t T_ = a.T, H = a.n_q + a.n_k, D = a.D, P = a.P, W = (H + a.n_k) * D;
  const int64_t chunk = (a.B * T_ + workers - 1) / workers;
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> dy(D), n(D);
    for (int64_t w = w0; w < w1; ++w) {
      float* dg = dgain.data() + w * 2 * D;
      for (int64_t bt = w * chunk; bt < std::min(a.B * T_, (w + 1) * chunk); ++bt) {
        const int64_t b = bt / T_, t = bt % T_;
        const T* xr = x + b * a.sb + t * a.st;
        T* dxr = dx + bt * W;
        const float* ct = a.c + t * P;
        const float* sn = a.s + t * P;
        for (int64_t h = 0; h < H; ++h) {
          const bool is_q = h < a.n_q;
          const GradView<G>& gv = is_q ? gq_ : gk_;
          const G* gh = gv.p + b * gv.sb + t * gv.st + (is_q ? h : h - a.n_q) * gv.sh;
          const T* xh = xr + h * D;
          T* dxh = dxr + h * D;
          const float* g = is_q ? a.gq : a.gk;
          for (int64_t i = 0; i < P; ++i) {  // the inverse rotation
            const float ga = static_cast<float>(gh[2 * i]), gb = static_cast<float>(gh[2 * i + 1]);
            dy[2 * i] = ga * ct[i] + gb * sn[i];
            dy[2 * i + 1] = -ga * sn[i] + gb * ct[i];
          }
          if (!norm) {
            for (int64_t d = 0; d < D; ++d) dxh[d] = to_elem<T>(dy[d]);
            continue;
          }
          const float r = rs[bt * H + h];
          for (int64_t d = 0; d < D; ++d) n[d] = static_cast<float>(xh[d]) * r;
          if (g) {
            float* dgh = dg + (is_q ? 0 : D);
            for (int64_t d = 0; d < D; ++d) {
              dgh[d] += dy[d] * n[d];
              dy[d] *= g[d];  // dn
            }
          }
          const float mean = dot_lanes(dy.data(), n.data(), D) / static_cast<float>(D);
          for (int64_t d = 0; d < D; ++d) dxh[d] = to_elem<T>(r * (dy[d] - n[d] * mean));
        }
        for (int64_t h = 0; h < a.n_k; ++h) {  // the values' gradient: cast
          const G* gh = gv_.p + b * gv_.sb + t * gv_.st + h * gv_.sh;
          T* dxh = dxr + (H + h) * D;
          for (int64_t d = 0; d < D; ++d) dxh[d] = to_elem<T>(static_cast<float>(gh[d]));
        }
      }
    }
  });
}

// dq, dk, dv: float32 or bfloat16, all three of one dtype (the forward's out_dtype). dqkv (B, T,
// width) contiguous, in qkv's dtype; dq_gain and dk_gain (head_dim,) float32 (empty without norm
// or without that gain).
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_norm_rope_backward(
    const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& qkv,
    const at::Tensor& rstd, int64_t n_q, int64_t n_k, int64_t head_dim,
    const c10::optional<at::Tensor>& q_gain, const c10::optional<at::Tensor>& k_gain,
    const at::Tensor& cos, const at::Tensor& sin, bool norm) {
  const char* op = "minigpt::qkv_norm_rope_backward";
  const Operands a = operands(op, qkv, n_q, n_k, head_dim, q_gain, k_gain, cos, sin);
  const int64_t B = a.B, T = a.T, D = a.D;
  const at::ScalarType gt = dq.scalar_type();
  TORCH_CHECK((gt == at::kFloat || gt == at::kBFloat16) && dk.scalar_type() == gt &&
                  dv.scalar_type() == gt,
              op, ": dq, dk and dv must be all float32 or all bfloat16, got ", gt, ", ",
              dk.scalar_type(), ", ", dv.scalar_type());
  TORCH_CHECK(!norm || (rstd.scalar_type() == at::kFloat && rstd.is_contiguous() &&
                        rstd.numel() == B * T * (n_q + n_k)),
              op, ": rstd must be the forward's");
  at::Tensor dx = at::empty({B, T, qkv.size(2)}, qkv.options());
  // Per-worker partial sums of the gains' gradients, added in a fixed order: deterministic for
  // a given thread count.
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * T));
  std::vector<float> dgain(static_cast<size_t>(workers * 2 * D), 0.f);
#ifdef MINIGPT_HAVE_QK_AVX512
  if (gt == at::kBFloat16 && qkv.scalar_type() == at::kBFloat16 && qk_rope_avx512_enabled()) {
    const GradView<at::BFloat16> gq = grad_view<at::BFloat16>(op, "dq", dq, B, T, n_q, D);
    const GradView<at::BFloat16> gk = grad_view<at::BFloat16>(op, "dk", dk, B, T, n_k, D);
    const GradView<at::BFloat16> gv = grad_view<at::BFloat16>(op, "dv", dv, B, T, n_k, D);
    auto u16 = [](const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); };
    qk512::backward_rows(a, static_cast<const uint16_t*>(qkv.data_ptr()), u16(gq.p), gq.sb, gq.st,
                         gq.sh, u16(gk.p), gk.sb, gk.st, gk.sh, u16(gv.p), gv.sb, gv.st, gv.sh,
                         norm ? rstd.data_ptr<float>() : nullptr,
                         static_cast<uint16_t*>(dx.data_ptr()), dgain, workers, norm);
  } else {
#else
  {
#endif
  auto run = [&](auto grad_tag) {
    using G = decltype(grad_tag);
    const GradView<G> gq = grad_view<G>(op, "dq", dq, B, T, n_q, D);
    const GradView<G> gk = grad_view<G>(op, "dk", dk, B, T, n_k, D);
    const GradView<G> gv = grad_view<G>(op, "dv", dv, B, T, n_k, D);
    with_qkv_type(qkv.scalar_type(), [&](auto tag) {
      using Elem = decltype(tag);
      backward_rows<Elem, G>(a, static_cast<const Elem*>(qkv.data_ptr()), gq, gk, gv,
                             norm ? rstd.data_ptr<float>() : nullptr,
                             static_cast<Elem*>(dx.data_ptr()), dgain, workers, norm);
    });
  };
  if (gt == at::kBFloat16) {
    run(at::BFloat16{});
  } else {
    run(float{});
  }
  }
  const auto f32 = qkv.options().dtype(at::kFloat);
  at::Tensor dq_gain = at::empty({0}, f32), dk_gain = at::empty({0}, f32);
  if (norm && (a.gq || a.gk)) {
    at::Tensor sums = at::zeros({2, D}, f32);
    float* sp = sums.data_ptr<float>();
    for (int64_t w = 0; w < workers; ++w)
      for (int64_t j = 0; j < 2 * D; ++j) sp[j] += dgain[w * 2 * D + j];
    if (a.gq) dq_gain = sums[0].clone();
    if (a.gk) dk_gain = sums[1].clone();
  }
  return {dx, dq_gain, dk_gain};
}

}  // namespace
}  // namespace minigpt

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def(
      "qkv_norm_rope_forward(Tensor qkv, int n_q, int n_k, int head_dim, Tensor? q_gain, "
      "Tensor? k_gain, Tensor cos, Tensor sin, float eps, bool norm, "
      "ScalarType? out_dtype=None) -> (Tensor q, Tensor k, Tensor v, Tensor rstd)");
  m.def(
      "qkv_norm_rope_backward(Tensor dq, Tensor dk, Tensor dv, Tensor qkv, Tensor rstd, int n_q, "
      "int n_k, int head_dim, Tensor? q_gain, Tensor? k_gain, Tensor cos, Tensor sin, "
      "bool norm) -> (Tensor dqkv, Tensor dq_gain, Tensor dk_gain)");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("qkv_norm_rope_forward", &minigpt::qkv_norm_rope_forward);
  m.impl("qkv_norm_rope_backward", &minigpt::qkv_norm_rope_backward);
}
