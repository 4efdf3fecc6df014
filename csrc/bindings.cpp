// minigpt attention: op schemas, the CPU registration, and the private Python module minigpt._C.
//
// The ops are bound with TORCH_LIBRARY schemas (pytorch/extension-cpp) so that the Python side
// can register fake (meta) and autograd formulas with torch.library, which is what torch.compile
// and torch.library.opcheck need. The CUDA registration lives in csrc/cuda/attention_cuda.cpp.
#include <torch/extension.h>
#include <torch/library.h>
#if __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include <string>

#include "attention.h"
#include "attention_host.h"

namespace minigpt {
namespace {

const Accepts kCpu = accepts(c10::DeviceType::CPU, kCpuDTypes);

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window) {
  const char* op = "minigpt::attention_forward";
  check_qkv(op, q, k, v, causal, kCpu);
  check_terms(op, q, alibi_slopes, window, causal, kCpuHasAlibi, kCpuHasWindow);
  auto [out, lse] = empty_forward_outputs(q);
  AttentionParams p = make_params(q, k, v, causal, scale);
  set_terms(p, alibi_slopes, window);
  p.out = out.data_ptr();
  p.out_stride = strides_of(out);
  p.lse = lse.data_ptr<float>();
  attention_forward_cpu(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window) {
  const char* op = "minigpt::attention_backward";
  check_qkv(op, q, k, v, causal, kCpu);
  check_terms(op, q, alibi_slopes, window, causal, kCpuHasAlibi, kCpuHasWindow);
  check_backward_inputs(op, dout, out, lse, q, kCpu);

  auto [dq, dk, dv] = empty_backward_outputs(q, k, v);
  AttentionParams p = make_params(q, k, v, causal, scale);
  set_terms(p, alibi_slopes, window);
  const at::Tensor lse_c = lse.contiguous();
  set_backward_params(p, out, lse_c, dout, dq, dk, dv);
  p.deterministic = true;  // the CPU backward always is (for a given thread count)
  attention_backward_cpu(p);
  return {dq, dk, dv};
}

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

}  // namespace
}  // namespace minigpt

TORCH_LIBRARY(minigpt, m) {
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, bool causal, float scale, "
      "Tensor? alibi_slopes=None, int window=0) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "bool causal, float scale, Tensor? alibi_slopes=None, int window=0) -> "
      "(Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(minigpt, CPU, m) {
  m.impl("attention_forward", &minigpt::attention_forward);
  m.impl("attention_backward", &minigpt::attention_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minigpt compiled attention kernels (ops live under torch.ops.minigpt)";
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        info["compiler"] = minigpt::compiler_name();
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        info["vector_isa"] = std::string(minigpt::attention_cpu_isa());
        info["bf16_products"] = std::string(minigpt::attention_cpu16_products());
        // What the kernels implement (attention.h), so Python never restates it.
        pybind11::dict dtypes;
        pybind11::list cpu, cuda, head_dims;
        for (minigpt::DType t : minigpt::kCpuDTypes) cpu.append(minigpt::dtype_name(t));
        dtypes["cpu"] = cpu;
#ifdef MINIGPT_WITH_CUDA
        for (minigpt::DType t : minigpt::kCudaDTypes) cuda.append(minigpt::dtype_name(t));
        for (int d : minigpt::kCudaHeadDims) head_dims.append(d);
        dtypes["cuda"] = cuda;
#endif
        info["dtypes"] = dtypes;
        // The optional score terms per device (attention.h), e.g. {"cpu": ["alibi", "window"]}.
        pybind11::dict features;
        auto terms = [](bool alibi, bool window) {
          pybind11::list l;
          if (alibi) l.append("alibi");
          if (window) l.append("window");
          return l;
        };
        features["cpu"] = terms(minigpt::kCpuHasAlibi, minigpt::kCpuHasWindow);
#ifdef MINIGPT_WITH_CUDA
        features["cuda"] = terms(minigpt::kCudaHasAlibi, minigpt::kCudaHasWindow);
#endif
        info["features"] = features;
        info["cuda_head_dims"] = head_dims;
#ifdef MINIGPT_WITH_CUDA
        info["cuda"] = true;
#else
        info["cuda"] = false;
#endif
#ifdef MINIGPT_CUDA_ARCHS
        // Passed as a bare token (e.g. 8.0_9.0) so no quotes have to survive the build's shell.
#define MINIGPT_STRINGIFY_(x) #x
#define MINIGPT_STRINGIFY(x) MINIGPT_STRINGIFY_(x)
        info["cuda_archs"] = std::string(MINIGPT_STRINGIFY(MINIGPT_CUDA_ARCHS));
#else
        info["cuda_archs"] = std::string("");
#endif
#ifdef TORCH_VERSION
        info["torch_version"] = std::string(TORCH_VERSION);
#else
        info["torch_version"] = std::string("");
#endif
        return info;
      },
      "How this module was built: compiler, OpenMP, the CPU vector ISA in use, the dtypes per "
      "device and the CUDA head dims the kernels implement, CUDA and its architectures, torch "
      "version.");
}
