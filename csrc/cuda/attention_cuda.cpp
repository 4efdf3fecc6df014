// minigpt attention: the CUDA registration of minigpt::attention_forward / attention_backward
// (schemas in csrc/bindings.cpp). Checks every argument once, here at the boundary (STYLE.md #6),
// allocates outputs and scratch, fills the plain AttentionParams struct and launches the kernels of
// attention_fwd.cu / attention_bwd.cu under a device guard on the current stream (STYLE.md #7).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream, without cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#include "../attention.h"
#include "../attention_host.h"
#include "kernel_sets.h"

namespace minigpt {
namespace {

const Accepts kCuda = accepts(c10::DeviceType::CUDA, kCudaDTypes);

std::string head_dim_names() {  // "32, 64, 96, 128"
  std::string s;
  for (int d : kCudaHeadDims) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return s;
}

void check_qkv_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    bool causal) {
  check_qkv(op, q, k, v, causal, kCuda);
  TORCH_CHECK(cuda_head_dim_supported(q.size(3)), op, ": the CUDA kernels support head dims ",
              head_dim_names(), ", got q ", q.sizes());
}

// The bf16/fp16 kernels copy 16-byte row chunks: rows must start on 16 bytes. A view that breaks
// this (an odd slice offset or stride) is copied once rather than rejected.
at::Tensor rows_16b_aligned(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t;  // the fp32 kernels load element by element
  const int64_t elems = 16 / static_cast<int64_t>(t.element_size());
  auto ok = [elems](const at::Tensor& x) {
    if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
    for (int d = 0; d < 3; ++d)
      if (x.size(d) > 1 && x.stride(d) % elems != 0) return false;
    return true;
  };
  if (t.numel() == 0 || ok(t)) return t;
  // A fresh allocation from the caching allocator is aligned; contiguous() alone may keep an
  // unaligned storage offset.
  return t.clone(at::MemoryFormat::Contiguous);
}

// The kernel set MINIGPT_CUDA_KERNELS names, read at every call: "v2" (default) or "v1", the
// kernels of the first GPU run (kernel_sets.h). minigpt.gpu_table reads the same variable.
bool use_v1_kernels(const char* op) {
  const char* env = std::getenv("MINIGPT_CUDA_KERNELS");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "v2") == 0) return false;
  TORCH_CHECK(std::strcmp(env, "v1") == 0, op, ": MINIGPT_CUDA_KERNELS must be v2 or v1, got '",
              env, "'");
  return true;
}

void check_code(const char* op, int code, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(code == 0, op, " (CUDA) failed for q ", q.sizes(), ", k ", k.sizes(), " (",
              q.scalar_type(), "): ", attention_cuda_error_string(code), " [code ", code, "]");
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda_op(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal,
    double scale, const c10::optional<at::Tensor>& alibi_slopes, int64_t window) {
  const char* op = "minigpt::attention_forward";
  check_qkv_cuda(op, q_in, k_in, v_in, causal);
  check_terms(op, q_in, alibi_slopes, window, causal, kCudaHasAlibi, kCudaHasWindow);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_16b_aligned(q_in);
  const at::Tensor k = rows_16b_aligned(k_in);
  const at::Tensor v = rows_16b_aligned(v_in);

  auto [out, lse] = empty_forward_outputs(q);
  // Nothing to compute: an empty batch, no query heads or no queries (the kernels' grids would
  // have a zero dimension, which is a launch error).
  if (q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0) return {out, lse};
  AttentionParams p = make_params(q, k, v, causal, scale);
  set_terms(p, alibi_slopes, window);
  p.out = out.data_ptr();
  p.out_stride = strides_of(out);
  p.lse = lse.data_ptr<float>();
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  const int code = use_v1_kernels(op) ? v1::attention_forward_cuda(p, stream)
                                      : attention_forward_cuda(p, stream);
  check_code(op, code, q, k);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda_op(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, bool causal,
    double scale, const c10::optional<at::Tensor>& alibi_slopes, int64_t window) {
  const char* op = "minigpt::attention_backward";
  check_qkv_cuda(op, q_in, k_in, v_in, causal);
  check_terms(op, q_in, alibi_slopes, window, causal, kCudaHasAlibi, kCudaHasWindow);
  TORCH_CHECK(dout_in.dim() == 4, op, ": dout must be 4-d (B, H, T, D), got shape ",
              dout_in.sizes());
  // Gradients handed over by autograd can be expanded (stride 0) or otherwise odd; one copy here
  // is cheaper than a kernel path for them.
  const at::Tensor dout_c = dout_in.stride(3) == 1 ? dout_in : dout_in.contiguous();
  check_backward_inputs(op, dout_c, out_in, lse_in, q_in, kCuda);

  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_16b_aligned(q_in);
  const at::Tensor k = rows_16b_aligned(k_in);
  const at::Tensor v = rows_16b_aligned(v_in);
  const at::Tensor dout = rows_16b_aligned(dout_c);
  const at::Tensor out = rows_16b_aligned(out_in);  // the v2 delta kernel loads 16-byte chunks
  const at::Tensor lse = lse_in.contiguous();

  const bool deterministic = at::globalContext().deterministicAlgorithms();
  auto [dq, dk, dv] = empty_backward_outputs(q, k, v);
  // Nothing to launch for an empty batch or no queries; with no queries no key gets a gradient,
  // so dK and dV are zeros (dQ is empty).
  if (q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, f32);
  // Atomic dQ accumulates in float32 (B, Hq, Tq, D); deterministic dQ needs none. The v2 delta
  // kernel zero-fills it; v1 needs it zeroed here.
  const bool use_v1 = use_v1_kernels(op);
  at::Tensor dq_accum = deterministic ? at::Tensor()
                        : use_v1      ? at::zeros(q.sizes(), f32)
                                      : at::empty(q.sizes(), f32);

  AttentionParams p = make_params(q, k, v, causal, scale);
  set_terms(p, alibi_slopes, window);
  set_backward_params(p, out, lse, dout, dq, dk, dv);
  p.delta = delta.data_ptr<float>();
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.deterministic = deterministic;
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  const int code =
      use_v1 ? v1::attention_backward_cuda(p, stream) : attention_backward_cuda(p, stream);
  check_code(op, code, q, k);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace minigpt

TORCH_LIBRARY_IMPL(minigpt, CUDA, m) {
  m.impl("attention_forward", &minigpt::attention_forward_cuda_op);
  m.impl("attention_backward", &minigpt::attention_backward_cuda_op);
}
