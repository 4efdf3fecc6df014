// minigpt attention backward on CUDA: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster
// Attention with Better Parallelism and Work Partitioning"), Algorithm 2.
//
// With S = s Q K^T (s the softmax scale), P = softmax(S) recomputed from the forward's
// log-sum-exp L (P_ij = exp(S_ij - L_i), Alg. 2 line 11) and dO the output gradient:
//   D_i  = rowsum(dO_i * O_i)                       (line 4; "delta", stored in p.delta)
//   dV_j = sum_i P_ij dO_i                          (line 12)
//   dP   = dO V^T                                   (line 13)
//   dS   = P * (dP - D)   (elementwise, D per row)  (line 14)
//   dQ_i = s * sum_j dS_ij K_j                      (line 15)
//   dK_j = s * sum_i dS_ij Q_i                      (line 16)
// Grouped-query attention: dK and dV of a kv head sum over the G query heads of its group.
// ALiBi's bias is a constant of S (no gradient of its own): P is recomputed with it, as in the
// forward. With a window, the dK/dV kernels visit only the query tiles that can see their key
// tile, and the dQ kernels only the key tiles their queries can see.
//
// Kernels (bf16/fp16 on tensor cores, mma.sync m16n8k16 with fp32 accumulators):
//   1. delta: one warp per row.
//   2. dK/dV: one CTA per (key tile of 64, kv head, batch), 4 warps of 16 keys; loops over the
//      group's query heads and the query tiles that can see the key tile, keeping dK and dV in
//      registers (the transposed scores S^T, P^T, dP^T, dS^T are computed directly so each warp's
//      16 keys are the mma rows). Unless deterministic, dQ += dS K is added with float atomics into
//      p.dq_accum; a last kernel scales dq_accum into p.dq's dtype.
//   3. deterministic: a separate dQ kernel, one CTA per (query tile of 64, query head, batch),
//      loops over key tiles in order and writes p.dq directly; no atomics anywhere.
// float32 runs the same three steps with CUDA-core kernels (no tensor cores).
//
// The v1 kernel set (MINIGPT_CUDA_KERNELS=v1): the tensor-core kernels of the first GPU run
// (H100), selectable beside the current set (attention_bwd.cu), which is faster on an H200.
// The kernels are in bwd_v1_dkdv.cuh, bwd_v1_dq.cuh (bf16/fp16) and bwd_f32.cuh (float32, shared
// with the current set), included below; this file holds the delta and dQ-conversion kernels,
// the launchers and the entry point.
#include "common.cuh"
#include "kernel_sets.h"

namespace minigpt {
namespace gpu {
namespace v1 {
namespace {

// ----------------------------------------------------------------------------------------------
// delta = rowsum(dO * O), any dtype.

template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(const AttentionParams p) {
  constexpr int kRowsPerBlock = 256 / 32;
  const int lane = threadIdx.x % 32;
  const int64_t n_rows = p.B * p.Hq * p.Tq;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
       row < n_rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t i = row % p.Tq;
    const int64_t h = (row / p.Tq) % p.Hq;
    const int64_t b = row / (p.Tq * p.Hq);
    const T* o = static_cast<const T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h +
                 i * p.out_stride.t;
    const T* d = static_cast<const T*>(p.dout) + b * p.dout_stride.b + h * p.dout_stride.h +
                 i * p.dout_stride.t;
    float acc = 0.f;
    for (int64_t c = lane; c < p.D; c += 32) acc += to_float(o[c]) * to_float(d[c]);
    acc = warp_sum(acc);
    if (lane == 0) p.delta[row] = acc;  // row == (b * Hq + h) * Tq + i
  }
}

// dq = scale * dq_accum in dq's dtype (dq_accum is contiguous (B, Hq, Tq, D) float32).
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert_kernel(const AttentionParams p) {
  const int64_t total = p.B * p.Hq * p.Tq * p.D;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % p.D;
    const int64_t i = (idx / p.D) % p.Tq;
    const int64_t h = (idx / (p.D * p.Tq)) % p.Hq;
    const int64_t b = idx / (p.D * p.Tq * p.Hq);
    static_cast<T*>(p.dq)[b * p.dq_stride.b + h * p.dq_stride.h + i * p.dq_stride.t + d] =
        from_float<T>(p.dq_accum[idx] * p.scale);
  }
}

#include "bwd_v1_dkdv.cuh"
#include "bwd_v1_dq.cuh"
#include "bwd_f32.cuh"  // the float32 kernels are the same in both kernel sets

// ----------------------------------------------------------------------------------------------
// Launchers.

// Grid-stride kernels: enough blocks to fill the GPU, never more than the work.
inline unsigned stride_grid(int64_t work_items, int64_t per_block) {
  return static_cast<unsigned>(max64(1, min64(ceil_div(work_items, per_block), 65536)));
}

template <typename T>
int launch_delta(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.Hq * p.Tq;
  if (rows == 0) return kSuccess;
  return launch(attention_bwd_delta_kernel<T>, dim3(stride_grid(rows, 8)), dim3(256), 0, stream, p);
}

template <typename T>
int launch_dq_convert(const AttentionParams& p, cudaStream_t stream) {
  const int64_t total = p.B * p.Hq * p.Tq * p.D;
  if (total == 0) return kSuccess;
  return launch(attention_bwd_dq_convert_kernel<T>, dim3(stride_grid(total, 256)), dim3(256), 0,
                stream, p);
}

template <typename Kernel>
int launch_tiles(Kernel kernel, int64_t tiles, int64_t heads, size_t smem,
                 const AttentionParams& p, cudaStream_t stream) {
  if (tiles == 0) return kSuccess;
  if (tiles > 0x7fffffff || heads > 65535) return kErrGrid;
  if (int err = prepare_smem(kernel, smem)) return err;
  return launch(kernel, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(heads),
                             static_cast<unsigned>(p.B)),
                dim3(128), smem, stream, p);
}

template <typename T, int D, bool CAUSAL>
int run_bwd_half(const AttentionParams& p, cudaStream_t stream) {
  if (int err = require_sm80()) return err;
  const int64_t eb = sizeof(T);
  if (!rows_aligned(p.q, p.q_stride, p.B, p.Hq, p.Tq, eb, 16) ||
      !rows_aligned(p.k, p.k_stride, p.B, p.Hkv, p.Tk, eb, 16) ||
      !rows_aligned(p.v, p.v_stride, p.B, p.Hkv, p.Tk, eb, 16) ||
      !rows_aligned(p.dout, p.dout_stride, p.B, p.Hq, p.Tq, eb, 16) ||
      !rows_aligned(p.dq, p.dq_stride, p.B, p.Hq, p.Tq, eb, 4) ||
      !rows_aligned(p.dk, p.dk_stride, p.B, p.Hkv, p.Tk, eb, 4) ||
      !rows_aligned(p.dv, p.dv_stride, p.B, p.Hkv, p.Tk, eb, 4))
    return kErrAlignment;

  if (int err = launch_delta<T>(p, stream)) return err;
  // BM query rows per step: 64 for small heads, 32 for large ones (dK, dV stay in registers).
  constexpr int BM = D <= 64 ? 64 : 32;
  using Tr = BwdTraits<T, D, BM>;
  if (int err = launch_tiles(attention_bwd_dkdv_kernel<T, D, BM, CAUSAL>, ceil_div(p.Tk, Tr::BN),
                             p.Hkv, Tr::kSmemBytes, p, stream))
    return err;
  if (!p.deterministic) return launch_dq_convert<T>(p, stream);
  constexpr int BN = D <= 64 ? 64 : 32;
  using TrQ = BwdDqTraits<T, D, BN>;
  return launch_tiles(attention_bwd_dq_kernel<T, D, BN, CAUSAL>, ceil_div(p.Tq, TrQ::BM), p.Hq,
                      TrQ::kSmemBytes, p, stream);
}

template <int D, bool CAUSAL>
int run_bwd_f32(const AttentionParams& p, cudaStream_t stream) {
  if (int err = launch_delta<float>(p, stream)) return err;
  using Tr = BwdF32Traits<D>;
  if (int err = launch_tiles(attention_bwd_dkdv_f32_kernel<D, CAUSAL>, ceil_div(p.Tk, Tr::BN),
                             p.Hkv, Tr::kSmemBytes, p, stream))
    return err;
  if (!p.deterministic) return launch_dq_convert<float>(p, stream);
  using TrQ = BwdDqF32Traits<D>;
  return launch_tiles(attention_bwd_dq_f32_kernel<D, CAUSAL>, ceil_div(p.Tq, TrQ::BM), p.Hq,
                      TrQ::kSmemBytes, p, stream);
}

}  // namespace
}  // namespace v1
}  // namespace gpu

int v1::attention_backward_cuda(const AttentionParams& p, void* stream_ptr) {
  using namespace gpu;
  using namespace gpu::v1;
  if (int err = check_sizes(p)) return err;
  if (p.B == 0 || p.Hq == 0) return kSuccess;  // empty gradients
  // Empty tensors may have null data; everything else must be there.
  const bool has_q = p.Tq > 0, has_k = p.Tk > 0;
  if ((has_q && (p.q == nullptr || p.out == nullptr || p.dout == nullptr || p.lse == nullptr ||
                 p.delta == nullptr || p.dq == nullptr ||
                 (!p.deterministic && p.dq_accum == nullptr))) ||
      (has_k && (p.k == nullptr || p.v == nullptr || p.dk == nullptr || p.dv == nullptr)))
    return kErrNullPointer;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.dtype == DType::Float32) {
    return MINIGPT_HEADDIM_SWITCH(p.D, kD, [&] {
      return MINIGPT_BOOL_SWITCH(p.causal, kCausal, [&] { return run_bwd_f32<kD, kCausal>(p, stream); });
    });
  }
  return MINIGPT_HALF_SWITCH(p.dtype, T, [&] {
    return MINIGPT_HEADDIM_SWITCH(p.D, kD, [&] {
      return MINIGPT_BOOL_SWITCH(p.causal, kCausal,
                                 [&] { return run_bwd_half<T, kD, kCausal>(p, stream); });
    });
  });
}

}  // namespace minigpt
