// minigpt: QK-norm and RoPE of the queries and keys in one pass, forward and backward, on the CPU.
//
// What CausalSelfAttention.qkv does to the query and key heads of c_attn's output, fused:
// per head vector x (head_dim values) at position t,
//   n = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps)       (RMSNorm, Zhang & Sennrich 2019;
//   y = n * gain                                         QK-norm, Henry et al. 2020)
//   out[2i] = y[2i] cos(a) - y[2i+1] sin(a),             (RoPE, Su et al. 2021, eq. 34, pairs
//   out[2i+1] = y[2i] sin(a) + y[2i+1] cos(a)            (x[2i], x[2i+1]), a = t * inv_freq[i])
// With norm=false only the rotation. The unfused PyTorch code computes the same values in
// several passes over memory, each with its own autograd node; on two CPU cores that was about
// 15% of a training step of the default model.
//
// Backward, given dout: dy = the rotation by -a of dout; dgain += dy * n over every vector of the
// head kind; dn = dy * gain; dx = rstd * (dn - n * mean(dn * n)).
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace minigpt {
namespace {

void check_inputs(const char* op, const at::Tensor& x, int64_t n_q, int64_t n_k,
                  int64_t head_dim, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3, op,
              ": qkv must be a (B, T, width) float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(x.stride(2) == 1, op, ": qkv's last dimension must be contiguous");
  TORCH_CHECK(n_q > 0 && n_k > 0 && head_dim > 0 && head_dim % 2 == 0 &&
                  (n_q + n_k) * head_dim <= x.size(2),
              op, ": n_q, n_k, head_dim (even) must fit qkv's width ", x.size(2), ", got ", n_q,
              ", ", n_k, ", ", head_dim);
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

// What the forward and the backward read: checked shapes, qkv's rows, the angles and the gains.
struct Operands {
  int64_t B, T, H, D, P, sb, st;  // sizes; qkv's batch and time strides (in floats)
  const float *x, *c, *s, *gq, *gk;
};

Operands operands(const char* op, const at::Tensor& qkv, int64_t n_q, int64_t n_k,
                  int64_t head_dim, const c10::optional<at::Tensor>& q_gain,
                  const c10::optional<at::Tensor>& k_gain, const at::Tensor& cos,
                  const at::Tensor& sin) {
  check_inputs(op, qkv, n_q, n_k, head_dim, cos, sin);
  return {qkv.size(0), qkv.size(1), n_q + n_k, head_dim, head_dim / 2,
          qkv.stride(0), qkv.stride(1), qkv.data_ptr<float>(), cos.data_ptr<float>(),
          sin.data_ptr<float>(), gain_ptr(q_gain, head_dim, op), gain_ptr(k_gain, head_dim, op)};
}

// qk (B, T, n_q + n_k, head_dim) float32, rstd (B, T, n_q + n_k) (empty without norm).
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_forward(
    const at::Tensor& qkv, int64_t n_q, int64_t n_k, int64_t head_dim,
    const c10::optional<at::Tensor>& q_gain, const c10::optional<at::Tensor>& k_gain,
    const at::Tensor& cos, const at::Tensor& sin, double eps, bool norm) {
  const char* op = "minigpt::qk_norm_rope_forward";
  const Operands a = operands(op, qkv, n_q, n_k, head_dim, q_gain, k_gain, cos, sin);
  const int64_t B = a.B, T = a.T, H = a.H, D = a.D, P = a.P, sb = a.sb, st = a.st;
  const float *x = a.x, *c = a.c, *s = a.s, *gq = a.gq, *gk = a.gk;
  at::Tensor qk = at::empty({B, T, H, D}, qkv.options());
  at::Tensor rstd = norm ? at::empty({B, T, H}, qkv.options()) : at::empty({0}, qkv.options());
  float* out = qk.data_ptr<float>();
  float* rs = norm ? rstd.data_ptr<float>() : nullptr;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> y(D);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const float* xr = x + b * sb + t * st;
      const float* ct = c + t * P;
      const float* sn = s + t * P;
      for (int64_t h = 0; h < H; ++h) {
        const float* xh = xr + h * D;
        float* o = out + (bt * H + h) * D;
        const float* g = h < n_q ? gq : gk;
        float r = 1.f;
        if (norm) {
          float ss = 0.f;
          for (int64_t d = 0; d < D; ++d) ss += xh[d] * xh[d];
          r = 1.f / std::sqrt(ss / static_cast<float>(D) + feps);
          rs[bt * H + h] = r;
        }
        for (int64_t d = 0; d < D; ++d) y[d] = xh[d] * r * (g ? g[d] : 1.f);
        for (int64_t i = 0; i < P; ++i) {
          const float a = y[2 * i], bb = y[2 * i + 1];
          o[2 * i] = a * ct[i] - bb * sn[i];
          o[2 * i + 1] = a * sn[i] + bb * ct[i];
        }
      }
    }
  });
  return {qk, rstd};
}

// dx (B, T, (n_q + n_k) * head_dim), dq_gain and dk_gain (head_dim,) (empty without norm or
// without that gain).
std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward(
    const at::Tensor& dqk, const at::Tensor& qkv, const at::Tensor& rstd, int64_t n_q,
    int64_t n_k, int64_t head_dim, const c10::optional<at::Tensor>& q_gain,
    const c10::optional<at::Tensor>& k_gain, const at::Tensor& cos, const at::Tensor& sin,
    bool norm) {
  const char* op = "minigpt::qk_norm_rope_backward";
  const Operands a = operands(op, qkv, n_q, n_k, head_dim, q_gain, k_gain, cos, sin);
  const int64_t B = a.B, T = a.T, H = a.H, D = a.D, P = a.P, sb = a.sb, st = a.st;
  const float *x = a.x, *c = a.c, *s = a.s, *gq = a.gq, *gk = a.gk;
  TORCH_CHECK(dqk.scalar_type() == at::kFloat && dqk.sizes() == at::IntArrayRef({B, T, H, D}),
              op, ": dqk must be float32 (B, T, n_q + n_k, head_dim)");
  TORCH_CHECK(!norm || (rstd.is_contiguous() && rstd.numel() == B * T * H), op,
              ": rstd must be the forward's");
  const at::Tensor g_c = dqk.contiguous();
  at::Tensor dx = at::empty({B, T, H * D}, qkv.options());
  // Per-worker partial sums of the gains' gradients, added in a fixed order: deterministic for
  // a given thread count.
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * T));
  std::vector<float> dgain(static_cast<size_t>(workers * 2 * D), 0.f);
  const float* go = g_c.data_ptr<float>();
  const float* rs = norm ? rstd.data_ptr<float>() : nullptr;
  float* dxp = dx.data_ptr<float>();
  const int64_t chunk = (B * T + workers - 1) / workers;
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> dy(D), n(D);
    for (int64_t w = w0; w < w1; ++w) {
      float* dg = dgain.data() + w * 2 * D;
      for (int64_t bt = w * chunk; bt < std::min(B * T, (w + 1) * chunk); ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const float* xr = x + b * sb + t * st;
        const float* ct = c + t * P;
        const float* sn = s + t * P;
        for (int64_t h = 0; h < H; ++h) {
          const float* xh = xr + h * D;
          const float* gh = go + (bt * H + h) * D;
          float* dxh = dxp + bt * H * D + h * D;
          const bool is_q = h < n_q;
          const float* g = is_q ? gq : gk;
          for (int64_t i = 0; i < P; ++i) {  // the inverse rotation
            dy[2 * i] = gh[2 * i] * ct[i] + gh[2 * i + 1] * sn[i];
            dy[2 * i + 1] = -gh[2 * i] * sn[i] + gh[2 * i + 1] * ct[i];
          }
          if (!norm) {
            for (int64_t d = 0; d < D; ++d) dxh[d] = dy[d];
            continue;
          }
          const float r = rs[bt * H + h];
          float dot = 0.f;
          float* dgh = dg + (is_q ? 0 : D);
          for (int64_t d = 0; d < D; ++d) {
            n[d] = xh[d] * r;
            if (g) dgh[d] += dy[d] * n[d];
            const float dn = dy[d] * (g ? g[d] : 1.f);
            dy[d] = dn;
            dot += dn * n[d];
          }
          const float mean = dot / static_cast<float>(D);
          for (int64_t d = 0; d < D; ++d) dxh[d] = r * (dy[d] - n[d] * mean);
        }
      }
    }
  });
  at::Tensor dq_gain = at::empty({0}, qkv.options()), dk_gain = at::empty({0}, qkv.options());
  if (norm && (gq || gk)) {
    at::Tensor sums = at::zeros({2, D}, qkv.options());
    float* sp = sums.data_ptr<float>();
    for (int64_t w = 0; w < workers; ++w)
      for (int64_t j = 0; j < 2 * D; ++j) sp[j] += dgain[w * 2 * D + j];
    if (gq) dq_gain = sums[0].clone();
    if (gk) dk_gain = sums[1].clone();
  }
  return {dx, dq_gain, dk_gain};
}

}  // namespace
}  // namespace minigpt

TORCH_LIBRARY_FRAGMENT(minigpt, m) {
  m.def(
      "qk_norm_rope_forward(Tensor qkv, int n_q, int n_k, int head_dim, Tensor? q_gain, "
      "Tensor? k_gain, Tensor cos, Tensor sin, float eps, bool norm) -> (Tensor qk, Tensor rstd)");
  m.def(
      "qk_norm_rope_backward(Tensor dqk, Tensor qkv, Tensor rstd, int n_q, int n_k, int head_dim, "
      "Tensor? q_gain, Tensor? k_gain, Tensor cos, Tensor sin, bool norm) -> "
      "(Tensor dx, Tensor dq_gain, Tensor dk_gain)");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("qk_norm_rope_forward", &minigpt::qk_norm_rope_forward);
  m.impl("qk_norm_rope_backward", &minigpt::qk_norm_rope_backward);
}
