// minigpt attention: the parameter struct shared by host code and kernels.
//
// Kernels never see at::Tensor (FlashAttention's Flash_fwd_params): host code fills this plain
// struct with pointers, int64 sizes and element strides, so the CPU kernels and the CUDA .cu files
// compile without torch headers. Layout of every tensor is (batch, head, time, head_dim) with the
// last dimension contiguous; any other strides are allowed.
//
// Algorithm: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better
// Parallelism and Work Partitioning", Alg. 1 forward and Alg. 2 backward).
#pragma once

#include <cstdint>

namespace minigpt {

// Element strides of one 4-d (B, H, T, D) tensor; the D stride is 1.
struct Strides4 {
  int64_t b = 0;
  int64_t h = 0;
  int64_t t = 0;
};

enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

// What the kernels implement, declared once here: the host checks, MINIGPT_HEADDIM_SWITCH's
// template instances (csrc/cuda/common.cuh, which static_asserts it matches) and
// minigpt._C.build_info() (which Python reads) all derive from these lists.
inline constexpr int kCudaHeadDims[] = {32, 64, 96, 128};
inline constexpr DType kCpuDTypes[] = {DType::Float32, DType::Float64, DType::BFloat16,
                                       DType::Float16};
inline constexpr DType kCudaDTypes[] = {DType::BFloat16, DType::Float16, DType::Float32};
// The optional score terms each device's kernels implement (AttentionParams::alibi_slopes and
// ::window). The host refuses a term a device's kernels lack; Python routes such calls elsewhere.
inline constexpr bool kCpuHasAlibi = true, kCpuHasWindow = true;
inline constexpr bool kCudaHasAlibi = true, kCudaHasWindow = true;

constexpr bool cuda_head_dim_supported(int64_t d) {
  for (int h : kCudaHeadDims)
    if (h == d) return true;
  return false;
}

// torch's name of a dtype ("float32", ...), as Python reports it.
constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
  }
  return "unknown";
}

struct AttentionParams {
  // Sizes. q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D); Hq % Hkv == 0.
  int64_t B = 0, Hq = 0, Hkv = 0, Tq = 0, Tk = 0, D = 0;

  DType dtype = DType::Float32;  // dtype of q, k, v, out, dout, dq, dk, dv
  float scale = 1.0f;            // softmax scale, usually 1/sqrt(D)
  bool causal = true;            // query i sees keys j <= i + (Tk - Tq) (bottom-right aligned)

  // Forward inputs.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides4 q_stride, k_stride, v_stride;

  // Forward outputs (also backward inputs). lse: (B, Hq, Tq) float32, contiguous.
  void* out = nullptr;
  Strides4 out_stride;
  float* lse = nullptr;

  // Backward only. dq has q's shape, dk and dv have k's shape.
  const void* dout = nullptr;
  Strides4 dout_stride;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides4 dq_stride, dk_stride, dv_stride;

  // Backward scratch supplied by the host (may be null where a kernel does not need it):
  // delta = rowsum(dout * out), (B, Hq, Tq) float32 contiguous; dq_accum, float32 of q's shape,
  // contiguous, zero-filled, for kernels that accumulate dq across key tiles.
  float* delta = nullptr;
  float* dq_accum = nullptr;
  bool deterministic = false;    // CUDA: no atomics in the dq reduction

  // The softmax scale in double precision for float64 kernels (a float scale would cap them at
  // ~1e-8 relative error); 0 means unset, and they fall back to `scale`.
  double scale_fp64 = 0.0;

  // ALiBi (Press et al. 2022): float32 (Hq,) slopes, or null. Head h adds
  // -alibi_slopes[h] * (i + causal_offset() - j) to the scaled score of query row i and key j.
  const float* alibi_slopes = nullptr;
  // Sliding window (causal only): > 0 lets query row i see keys
  // i + causal_offset() - window < j <= i + causal_offset(); 0 means no window.
  int64_t window = 0;

  // Offset between query row i and the last key it may see: keys j <= i + causal_offset().
  int64_t causal_offset() const { return Tk - Tq; }
  // The first key query row i may see (0 without a window).
  int64_t first_key(int64_t i) const {
    const int64_t first = i + causal_offset() - window + 1;
    return window > 0 && first > 0 ? first : 0;
  }
  int64_t group_size() const { return Hq / Hkv; }  // query heads per kv head (GQA)
};

// CPU kernels (csrc/attention_cpu.cpp). They read p.dtype: any of kCpuDTypes (BFloat16 and
// Float16 go to the kernels below).
void attention_forward_cpu(const AttentionParams& p);
void attention_backward_cpu(const AttentionParams& p);
// The BFloat16/Float16 CPU kernels (csrc/attention_cpu_bf16.cpp).
void attention_forward_cpu16(const AttentionParams& p);
void attention_backward_cpu16(const AttentionParams& p);
// Vector path the CPU kernels use in this process: "avx512", "avx2+fma" or "portable". The best
// the CPU supports, or the one MINIGPT_CPU_ISA=avx512|avx2|portable asks for (a path the CPU
// lacks falls back to the best it has, with a warning). Throws (c10::Error) for any other value
// of MINIGPT_CPU_ISA. Read once per process.
const char* attention_cpu_isa();
// What computes the bfloat16 CPU kernels' tile products in this process: "avx512_bf16" (our
// vdpbf16ps tiles: the CPU has AVX512-BF16 and the vector path is avx512) or "brgemm" (ATen's
// at::native::cpublas::brgemm, as float16 always uses).
const char* attention_cpu16_products();

// CUDA kernels (csrc/cuda/*.cu): launched on `stream` (a cudaStream_t passed as void* so this
// header needs no CUDA headers). They return a non-zero error code on a failed launch or an
// unsupported head dim; the host glue turns that into a TORCH_CHECK.
int attention_forward_cuda(const AttentionParams& p, void* stream);
int attention_backward_cuda(const AttentionParams& p, void* stream);
// Text for a non-zero code returned by the two functions above (static storage, never null).
const char* attention_cuda_error_string(int code);

}  // namespace minigpt
