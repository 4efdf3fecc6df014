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
//   1. delta: one warp per row; it also zero-fills p.dq_accum (the host allocates it uninitialised).
//   2. dK/dV, in FlashAttention-2's layout (bwd_dkdv.cuh): one CTA per (key tile, kv head,
//      batch), 128 keys and 8 warps where the device's shared memory holds the tiles (64 keys and
//      4 warps otherwise); loops over the group's query heads and the query tiles that can see the
//      key tile, keeping dK and dV in registers. S and dP are computed once per step, P and dS go
//      through shared memory to the dV, dK and dQ products. Unless deterministic, dQ += dS K is
//      added with float atomics straight from the accumulators into p.dq_accum (float2 atomics
//      on sm_90); a last kernel scales dq_accum into p.dq's dtype.
//   3. deterministic: a separate dQ kernel, one CTA per (query tile of 64, query head, batch),
//      loops over key tiles in order and writes p.dq directly; no atomics anywhere.
// float32 runs the same three steps with CUDA-core kernels (no tensor cores).
// The kernels are in bwd_dkdv.cuh, bwd_dq.cuh (bf16/fp16) and bwd_f32.cuh, included below;
// this file holds the delta and dQ-conversion kernels, the launchers and the entry point.
#include "common.cuh"

#include <cstdlib>

namespace minigpt {
namespace gpu {
namespace {

// ----------------------------------------------------------------------------------------------
// delta = rowsum(dO * O), any dtype; and the zero-fill of dq_accum, fused (no separate memset).
// One warp per row; grid (ceil(Tq / 8), Hq, B): the row's indices come from the grid, no division.
// bf16/fp16 rows are read in 16-byte chunks (the host checks out and dout rows start on 16 bytes).

template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(const AttentionParams p) {
  constexpr int kRowsPerBlock = 256 / 32;
  const int lane = threadIdx.x % 32;
  const int i = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  if (i >= p.Tq) return;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int D = static_cast<int>(p.D);
  const T* o = static_cast<const T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h +
               static_cast<int64_t>(i) * p.out_stride.t;
  const T* d = static_cast<const T*>(p.dout) + b * p.dout_stride.b + h * p.dout_stride.h +
               static_cast<int64_t>(i) * p.dout_stride.t;
  const int64_t row = (b * p.Hq + h) * p.Tq + i;
  float acc = 0.f;
  if constexpr (std::is_same<T, float>::value) {
    for (int c = lane; c < D; c += 32) acc += o[c] * d[c];
  } else {
    constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte chunk
    for (int c = lane * kVec; c < D; c += 32 * kVec) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + c);
      const uint4 dv = *reinterpret_cast<const uint4*>(d + c);
      const T* oe = reinterpret_cast<const T*>(&ov);
      const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc += to_float(oe[e]) * to_float(de[e]);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
  if (p.dq_accum != nullptr) {  // D is a multiple of 32: rows of float4
    float4* zero = reinterpret_cast<float4*>(p.dq_accum + row * D);
    for (int c = lane; c < D / 4; c += 32) zero[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// dq = scale * dq_accum in dq's dtype (dq_accum is contiguous (B, Hq, Tq, D) float32). Grid
// (ceil(Tq / kRows), Hq, B); each thread converts one float4 chunk; divisions are by constants.
template <typename T, int D>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert_kernel(const AttentionParams p) {
  constexpr int kVec = D / 4;          // float4 chunks per row
  constexpr int kRows = 256 / kVec;    // rows per block
  const int row = threadIdx.x / kVec;
  const int c = threadIdx.x % kVec;
  const int i = blockIdx.x * kRows + row;
  if (row >= kRows || i >= p.Tq) return;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const float4 a =
      reinterpret_cast<const float4*>(p.dq_accum + ((b * p.Hq + h) * p.Tq + i) * D)[c];
  T* dst = static_cast<T*>(p.dq) + b * p.dq_stride.b + h * p.dq_stride.h +
           static_cast<int64_t>(i) * p.dq_stride.t + 4 * c;
  if constexpr (std::is_same<T, float>::value) {
    dst[0] = a.x * p.scale;
    dst[1] = a.y * p.scale;
    dst[2] = a.z * p.scale;
    dst[3] = a.w * p.scale;
  } else {  // dq rows start on 4 bytes: two b32 stores
    store_b32(dst, pack2<T>(a.x * p.scale, a.y * p.scale));
    store_b32(dst + 2, pack2<T>(a.z * p.scale, a.w * p.scale));
  }
}

// dQ += (x0, x1) at two adjacent float32 columns (even, so 8-byte aligned): one vector atomic on
// sm_90, two scalar ones before.
__device__ __forceinline__ void atomic_add2(float* addr, float x0, float x1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(addr), make_float2(x0, x1));
#else
  atomicAdd(addr, x0);
  atomicAdd(addr + 1, x1);
#endif
}

#include "bwd_dkdv.cuh"
#include "bwd_dq.cuh"
#include "bwd_f32.cuh"

// ----------------------------------------------------------------------------------------------
// Launchers.

template <typename T>
int launch_delta(const AttentionParams& p, cudaStream_t stream) {
  if (p.Tq == 0) return kSuccess;
  const int64_t blocks = ceil_div(p.Tq, 8);
  if (blocks > 0x7fffffff) return kErrGrid;
  return launch(attention_bwd_delta_kernel<T>,
                dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(p.Hq),
                     static_cast<unsigned>(p.B)),
                dim3(256), 0, stream, p);
}

template <typename T>
int launch_dq_convert(const AttentionParams& p, cudaStream_t stream) {
  if (p.Tq == 0) return kSuccess;
  return MINIGPT_HEADDIM_SWITCH(p.D, kD, [&] {
    constexpr int kRows = 256 / (kD / 4);
    const int64_t blocks = ceil_div(p.Tq, kRows);
    if (blocks > 0x7fffffff) return static_cast<int>(kErrGrid);
    return launch(attention_bwd_dq_convert_kernel<T, kD>,
                  dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(p.Hq),
                       static_cast<unsigned>(p.B)),
                  dim3(256), 0, stream, p);
  });
}

template <typename Kernel>
int launch_tiles(Kernel kernel, int64_t tiles, int64_t heads, size_t smem,
                 const AttentionParams& p, cudaStream_t stream, int threads = 128) {
  if (tiles == 0) return kSuccess;
  if (tiles > 0x7fffffff || heads > 65535) return kErrGrid;
  if (int err = prepare_smem(kernel, smem)) return err;
  return launch(kernel, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(heads),
                             static_cast<unsigned>(p.B)),
                dim3(threads), smem, stream, p);
}

// Shared memory a block of the current device may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin).
inline int smem_optin(size_t* bytes) {
  int dev = 0, optin = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return cuda_code(e);
  if (cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
      e != cudaSuccess)
    return cuda_code(e);
  *bytes = static_cast<size_t>(optin);
  return kSuccess;
}

// MINIGPT_CUDA_BWD_TILES=small: the dK/dV kernel's small tiles even where the large ones fit, so
// that a GPU with room for both can test both. Read once.
inline bool small_tiles_forced() {
  static const bool forced = [] {
    const char* e = std::getenv("MINIGPT_CUDA_BWD_TILES");
    return e != nullptr && std::strcmp(e, "small") == 0;
  }();
  return forced;
}

// The dK/dV kernel with the large tiles where the device's shared memory holds them, else the
// small ones (see BwdTraits).
template <typename T, int D, bool CAUSAL, bool ALIBI, bool WINDOW>
int launch_dkdv(const AttentionParams& p, cudaStream_t stream) {
  size_t optin = 0;
  if (int err = smem_optin(&optin)) return err;
  if (small_tiles_forced()) optin = 0;
  const auto run = [&](auto large_tag) {
    constexpr bool kLarge = decltype(large_tag)::value;
    using Tr = BwdTraits<T, D, kLarge>;
    return launch_tiles(attention_bwd_dkdv_kernel<T, D, kLarge, CAUSAL, ALIBI, WINDOW>,
                        ceil_div(p.Tk, Tr::BN), p.Hkv, Tr::kSmemBytes, p, stream, Tr::kThreads);
  };
  if (optin >= BwdTraits<T, D, true>::kSmemBytes) return run(BoolTag<true>{});
  return run(BoolTag<false>{});
}

template <typename T, int D, bool CAUSAL>
int run_bwd_half(const AttentionParams& p, cudaStream_t stream) {
  if (int err = require_sm80()) return err;
  const int64_t eb = sizeof(T);
  if (!rows_aligned(p.q, p.q_stride, p.B, p.Hq, p.Tq, eb, 16) ||
      !rows_aligned(p.k, p.k_stride, p.B, p.Hkv, p.Tk, eb, 16) ||
      !rows_aligned(p.v, p.v_stride, p.B, p.Hkv, p.Tk, eb, 16) ||
      !rows_aligned(p.dout, p.dout_stride, p.B, p.Hq, p.Tq, eb, 16) ||
      !rows_aligned(p.out, p.out_stride, p.B, p.Hq, p.Tq, eb, 16) ||
      !rows_aligned(p.dq, p.dq_stride, p.B, p.Hq, p.Tq, eb, 4) ||
      !rows_aligned(p.dk, p.dk_stride, p.B, p.Hkv, p.Tk, eb, 4) ||
      !rows_aligned(p.dv, p.dv_stride, p.B, p.Hkv, p.Tk, eb, 4))
    return kErrAlignment;

  if (int err = launch_delta<T>(p, stream)) return err;
  if (!fits_int32_indices(p)) return kErrGrid;
  const int err = MINIGPT_BOOL_SWITCH(p.alibi_slopes != nullptr, kAlibi, [&] {
    return MINIGPT_BOOL_SWITCH(CAUSAL && p.window > 0, kWindow, [&] {
      if constexpr (kWindow && !CAUSAL) {
        return static_cast<int>(kErrShape);  // unreachable: the window needs causal
      } else {
        return launch_dkdv<T, D, CAUSAL, kAlibi, kWindow>(p, stream);
      }
    });
  });
  if (err) return err;
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
}  // namespace gpu

int attention_backward_cuda(const AttentionParams& p, void* stream_ptr) {
  using namespace gpu;
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
