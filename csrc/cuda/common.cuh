// minigpt CUDA attention: device helpers shared by attention_fwd.cu and attention_bwd.cu.
//
// Plain CUDA C++ (no torch headers). Fragment layouts below are those of the PTX ISA,
// "Matrix fragments for mma.m16n8k16 with floating point type" and "ldmatrix"; g = lane / 4 is
// the row group and t = lane % 4 the thread within a quad:
//
//   A (16x16, row-major), 4 x b32, 2 elements each:  a0 (row g,   cols 2t, 2t+1)
//                                                     a1 (row g+8, cols 2t, 2t+1)
//                                                     a2 (row g,   cols 2t+8, 2t+9)
//                                                     a3 (row g+8, cols 2t+8, 2t+9)
//   B (16x8, k x n), 2 x b32:                         b0 (k 2t, 2t+1;   col g)
//                                                     b1 (k 2t+8, 2t+9; col g)
//   C (16x8 fp32), 4 floats:                          c0, c1 (row g,   cols 2t, 2t+1)
//                                                     c2, c3 (row g+8, cols 2t, 2t+1)
//
// Two C tiles side by side (cols 0-7 and 8-15) hold exactly the elements of one A fragment, so a
// probability tile computed by one mma feeds the next mma from registers (FlashAttention-2 sec. 3).
//
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m, and
// lane l receives, from matrix m, row l/4, elements 2(l%4), 2(l%4)+1 (with .trans: rows 2(l%4),
// 2(l%4)+1 of column l/4). The three address patterns used by the kernels, for a 16x16 block at
// (row0, col0) of a row-major shared tile:
//   lds_row_a(): row0 + (lane & 15), col0 + (lane >> 4) * 8
//       plain  -> A fragment of the block;
//       .trans -> B fragments (k = rows) of the two n8 tiles col0.. and col0+8.. (r0,r1 | r2,r3).
//   lds_row_b(): row0 + (lane & 7) + (lane >> 4) * 8, col0 + ((lane >> 3) & 1) * 8
//       plain  -> B fragments (k = cols, n = rows) of the two n8 tiles row0.. and row0+8..;
//       .trans -> A fragment of the transposed block (A rows = tile cols).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../attention.h"

namespace minigpt {
namespace gpu {

// Return codes of attention_forward_cuda / attention_backward_cuda (see attention_cuda_error_string).
enum ErrorCode : int {
  kSuccess = 0,
  kErrHeadDim = 1,        // head dim not in kCudaHeadDims (attention.h)
  kErrDType = 2,          // dtype not bfloat16 / float16 / float32
  kErrShape = 3,          // negative sizes, Hkv == 0, Hq % Hkv != 0, or causal with Tq > Tk
  kErrGrid = 4,           // more batches, heads or tiles than one launch grid can index
  kErrNullPointer = 5,    // a required tensor or scratch pointer is null
  kErrAlignment = 6,      // bf16/fp16 rows must start on 16 bytes (pointer and b/h/t strides)
  kErrArch = 7,           // the tensor-core kernels need compute capability >= 8.0
  kErrSharedMemory = 8,   // the device offers less shared memory per block than a kernel needs
  kErrCudaBase = 1000,    // kErrCudaBase + cudaError_t: a CUDA call or kernel launch failed
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// STYLE.md #8: one switch per template axis; each expands to an immediately called lambda that
// returns the int error code of its body.
#define MINIGPT_BOOL_SWITCH(COND, NAME, ...)  \
  [&]() -> int {                              \
    if (COND) {                               \
      static constexpr bool NAME = true;      \
      return __VA_ARGS__();                   \
    }                                         \
    static constexpr bool NAME = false;       \
    return __VA_ARGS__();                     \
  }()

// The cases are kCudaHeadDims (attention.h), spelled out because a switch needs literal labels.
static_assert(sizeof(kCudaHeadDims) / sizeof(int) == 4 && kCudaHeadDims[0] == 32 &&
                  kCudaHeadDims[1] == 64 && kCudaHeadDims[2] == 96 && kCudaHeadDims[3] == 128,
              "MINIGPT_HEADDIM_SWITCH must list exactly kCudaHeadDims");
#define MINIGPT_HEADDIM_SWITCH(HEADDIM, NAME, ...)                      \
  [&]() -> int {                                                        \
    switch (HEADDIM) {                                                  \
      case 32: { static constexpr int NAME = 32; return __VA_ARGS__(); }   \
      case 64: { static constexpr int NAME = 64; return __VA_ARGS__(); }   \
      case 96: { static constexpr int NAME = 96; return __VA_ARGS__(); }   \
      case 128: { static constexpr int NAME = 128; return __VA_ARGS__(); } \
      default: return ::minigpt::gpu::kErrHeadDim;                      \
    }                                                                   \
  }()

#define MINIGPT_HALF_SWITCH(DTYPE, NAME, ...)                                      \
  [&]() -> int {                                                                   \
    switch (DTYPE) {                                                               \
      case ::minigpt::DType::BFloat16: { using NAME = __nv_bfloat16; return __VA_ARGS__(); } \
      case ::minigpt::DType::Float16: { using NAME = __half; return __VA_ARGS__(); }         \
      default: return ::minigpt::gpu::kErrDType;                                   \
    }                                                                              \
  }()

// ---------------------------------------------------------------------------------------------
// Host helpers.

inline int cuda_code(cudaError_t e) {
  return e == cudaSuccess ? kSuccess : kErrCudaBase + static_cast<int>(e);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sizes shared by both passes; kernels divide by Tq and Hkv, so those must be sane first.
inline int check_sizes(const AttentionParams& p) {
  if (p.B < 0 || p.Hq < 0 || p.Hkv <= 0 || p.Tq < 0 || p.Tk < 0 || p.D < 0) return kErrShape;
  if (p.Hq % p.Hkv != 0) return kErrShape;
  if (p.causal && p.Tq > p.Tk) return kErrShape;
  if (!cuda_head_dim_supported(p.D)) return kErrHeadDim;
  if (p.dtype != DType::Float32 && p.dtype != DType::BFloat16 && p.dtype != DType::Float16)
    return kErrDType;
  // gridDim.y and gridDim.z hold heads and batches.
  if (p.B > 65535 || p.Hq > 65535) return kErrGrid;
  return kSuccess;
}

// A (B, H, T, D) tensor whose rows start on `bytes`-byte boundaries. The stride of a size-1 dim is
// never multiplied by a non-zero index, so it may be anything.
inline bool rows_aligned(const void* ptr, const Strides4& s, int64_t nb, int64_t nh, int64_t nt,
                         int64_t elem_bytes, int64_t bytes) {
  if (reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) != 0) return false;
  const int64_t elems = bytes / elem_bytes;
  auto ok = [elems](int64_t stride, int64_t size) { return size <= 1 || stride % elems == 0; };
  return ok(s.b, nb) && ok(s.h, nh) && ok(s.t, nt);
}

inline int dtype_bytes(DType t) { return t == DType::Float32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------
// Device primitives: the only inline PTX and runtime calls the kernels depend on.
// BEGIN device primitives

inline int require_sm80() {
  int dev = 0, major = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return cuda_code(e);
  if (cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
      e != cudaSuccess)
    return cuda_code(e);
  return major >= 8 ? kSuccess : kErrArch;
}

// Kernels with more than 48 KB of dynamic shared memory must opt in per function.
template <typename Kernel>
inline int prepare_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return kSuccess;
  int dev = 0, optin = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return cuda_code(e);
  if (cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
      e != cudaSuccess)
    return cuda_code(e);
  if (bytes > static_cast<size_t>(optin)) return kErrSharedMemory;
  return cuda_code(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

// Launch and check: every launch goes through here so none escapes cudaGetLastError.
template <typename... KArgs, typename... Args>
inline int launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                  Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<Args&&>(args)...);
  return cuda_code(cudaGetLastError());
}

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char minigpt_dynamic_smem[];
  return reinterpret_cast<T*>(minigpt_dynamic_smem);
}

// The tensor-core primitives exist from sm_80 on; the host refuses older devices (require_sm80)
// before launching, so there they only need to compile.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MINIGPT_SM80_OR_TRAP(...) __trap()
#else
#define MINIGPT_SM80_OR_TRAP(...) __VA_ARGS__
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; when !valid the 16 shared bytes are zero-filled and src is not read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  MINIGPT_SM80_OR_TRAP(asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                        smem_addr(dst)),
                                    "l"(src), "r"(valid ? 16 : 0)
                                    : "memory"));
}

__device__ __forceinline__ void cp_async_commit() {
  MINIGPT_SM80_OR_TRAP(asm volatile("cp.async.commit_group;\n" ::: "memory"));
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  MINIGPT_SM80_OR_TRAP(asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  MINIGPT_SM80_OR_TRAP(asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                                    : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                                    : "r"(smem_addr(p))
                                    : "memory"));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  MINIGPT_SM80_OR_TRAP(
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(smem_addr(p))
                   : "memory"));
}

// c += a * b on tensor cores, fp32 accumulation; T is __nv_bfloat16 or __half.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    MINIGPT_SM80_OR_TRAP(asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                             "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                             : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)));
  } else {
    static_assert(std::is_same<T, __half>::value, "mma_16816: bfloat16 or float16");
    MINIGPT_SM80_OR_TRAP(asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                             "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                             : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)));
  }
}

__device__ __forceinline__ float shfl_xor(float x, int mask) {
  return __shfl_xor_sync(0xffffffffu, x, mask);
}

// END device primitives
// ---------------------------------------------------------------------------------------------
// Device helpers built on the primitives.

// Two floats -> one b32 register of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &v, sizeof(u));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&u, &v, sizeof(u));
  }
  return u;
}

__device__ __forceinline__ void store_b32(void* dst, uint32_t v) {
  *reinterpret_cast<uint32_t*>(dst) = v;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

// Reductions over the 4 lanes of a quad (one row of an mma C fragment) and over a warp.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, shfl_xor(x, 1));
  return fmaxf(x, shfl_xor(x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += shfl_xor(x, 1);
  return x + shfl_xor(x, 2);
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) x = fmaxf(x, shfl_xor(x, m));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) x += shfl_xor(x, m);
  return x;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ldmatrix row addresses (see the header comment), as element offsets into a tile whose rows are
// `stride` elements apart.
__device__ __forceinline__ int lds_row_a(int row0, int col0, int stride, int lane) {
  return (row0 + (lane & 15)) * stride + col0 + (lane >> 4) * 8;
}
__device__ __forceinline__ int lds_row_b(int row0, int col0, int stride, int lane) {
  return (row0 + (lane & 7) + (lane >> 4) * 8) * stride + col0 + ((lane >> 3) & 1) * 8;
}

// A fragment (16 rows x 16 cols) from two adjacent fp32 C tiles: s[0] holds cols 0-7, s[1] 8-15.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&s0)[4], const float (&s1)[4]) {
  a[0] = pack2<T>(s0[0], s0[1]);
  a[1] = pack2<T>(s0[2], s0[3]);
  a[2] = pack2<T>(s1[0], s1[1]);
  a[3] = pack2<T>(s1[2], s1[3]);
}

// Query row of the packed (head in group, query) row index used by the forward kernels: the
// forward tiles the G * Tq rows of a GQA group together, so a decode step (Tq = 1) with G query
// heads per kv head fills G rows of one tile instead of one row of G tiles.
struct PackedRow {
  int64_t head;  // query head
  int64_t i;     // query position
};
__device__ __forceinline__ PackedRow unpack_row(int64_t r, int64_t hkv, int64_t group, int64_t tq) {
  return {hkv * group + r / tq, r % tq};
}

// ---------------------------------------------------------------------------------------------
// The optional score terms (AttentionParams::alibi_slopes and ::window).
//
// ALiBi adds -slope_h * (i' - j) = slope_h * (j - i') to the scaled score, i' = i + Tk - Tq. The
// 16-bit (tensor-core) kernels' scores are in base 2 (multiplied by log2(e)), so they take the
// slope in base 2 too and add slope_log2 * (j - i'), with j - i' formed exactly in float from small
// integers; the float32 kernels stay in natural units (alibi_slope, exp_of_difference below). The
// forward and the backward add the bias the same way, so the backward's P matches the forward's
// lse (which is logsumexp over the visible keys of scale * q.k + bias).
//
// The window hides keys j <= i' - window. Key tiles (forward, dQ) and query tiles (dK/dV) that are
// wholly hidden are never visited: the loop bounds below skip them, so the cost grows as T * window.

// Query head h's ALiBi slope times log2(e); 0 without ALiBi.
__device__ __forceinline__ float alibi_slope_log2(const AttentionParams& p, int64_t h) {
  return p.alibi_slopes != nullptr ? p.alibi_slopes[h] * kLog2e : 0.f;
}

// The float32 kernels keep scores, running maxima and lse in natural units and take only the
// difference x - m to base 2, in exp_of_difference. ALiBi's bias grows to |slope| * T, and in base
// 2 it would be rounded at 1.44 times that size, with the slope rounded too (slope * log2(e)) and
// lse converted twice: 4x the naive float32 computation's error in dV (the rule allows 2x). In
// natural units the bias is rounded once, in the fma that adds it, as in the reference.

// Query head h's ALiBi slope; 0 without ALiBi.
__device__ __forceinline__ float alibi_slope(const AttentionParams& p, int64_t h) {
  return p.alibi_slopes != nullptr ? p.alibi_slopes[h] : 0.f;
}

// exp(x - m) for x, m in natural units (x = -inf gives 0).
__device__ __forceinline__ float exp_of_difference(float x, float m) {
  return exp2f((x - m) * kLog2e);
}

// The first key query position i may see (AttentionParams::first_key for device code): 0 without
// a window.
__host__ __device__ __forceinline__ int64_t first_key(const AttentionParams& p, int64_t i) {
  const int64_t first = i + (p.Tk - p.Tq) - p.window + 1;
  return p.window > 0 && first > 0 ? first : 0;
}

// One past the last query position that sees any key of the tile n0 .. n0 + BN - 1 (the dK/dV
// kernels' bound on their query tiles): query i sees key j only if j > i + Tk - Tq - window.
template <bool CAUSAL>
__device__ __forceinline__ int64_t window_query_end(const AttentionParams& p, int64_t n0, int BN) {
  if (!CAUSAL || p.window <= 0) return p.Tq;
  const int64_t j_last = min64(n0 + BN, p.Tk) - 1;
  return max64(0, min64(p.Tq, j_last + p.window - (p.Tk - p.Tq)));
}

// The key tiles a block of query rows visits, in order: the runs [b0, e0) and then [b1, e1)
// (e0 <= b1; the second run is empty unless the block's rows straddle two heads of a GQA group
// whose windows leave a gap between them).
struct TileRuns {
  int b0, e0, b1, e1;
  __device__ __forceinline__ int count() const { return (e0 - b0) + (e1 - b1); }
  __device__ __forceinline__ int at(int step) const {
    return step < e0 - b0 ? b0 + step : b1 + (step - (e0 - b0));
  }
};

// The key tiles of size BN seen by the packed rows r0 .. r_last (see PackedRow) of one kv head.
// Causal: a row at position i sees keys first_key(i) .. i + Tk - Tq. Rows of one head are
// consecutive positions; a block that straddles two heads holds the first head's last positions
// (which see first_key(i0) .. Tk - 1) and the second head's first ones (first_key(0) .. i1 + Tk - Tq),
// two key ranges with a gap between them when the window is short; a block that covers a whole
// head sees every key from first_key(0) on.
template <bool CAUSAL>
__device__ __forceinline__ TileRuns key_tiles(const AttentionParams& p, int64_t r0, int64_t r_last,
                                              int BN) {
  const int n_all = static_cast<int>(ceil_div(p.Tk, BN));
  if (!CAUSAL) return {0, n_all, n_all, n_all};
  const int64_t offset = p.Tk - p.Tq;
  const int64_t h0 = r0 / p.Tq, h1 = r_last / p.Tq;
  const int64_t i0 = r0 % p.Tq, i1 = r_last % p.Tq;
  auto first_tile = [&](int64_t i) { return static_cast<int>(first_key(p, i) / BN); };
  auto end_tile = [&](int64_t i) {  // one past the tile of row i's last key
    return static_cast<int>(ceil_div(min64(p.Tk, i + offset + 1), BN));
  };
  if (h0 == h1) {
    const int b = first_tile(i0), e = end_tile(i1);
    return {b, e, e, e};
  }
  if (h1 - h0 >= 2) return {first_tile(0), n_all, n_all, n_all};
  const int b_second = first_tile(0), e_second = end_tile(i1), b_first = first_tile(i0);
  if (e_second >= b_first) return {b_second, n_all, n_all, n_all};
  return {b_second, e_second, b_first, n_all};
}


// ---------------------------------------------------------------------------------------------
// 32-bit index arithmetic for the v2 kernels. The host guarantees that every row, key and packed
// row index fits in int32 (fits_int32_indices), so tile bounds are computed once per CTA in 32
// bits and no 64-bit division (an out-of-line CALL in SASS) is left in any kernel; only pointer
// offsets (index * int64 stride) stay 64-bit.

// Whether the packed rows (G * Tq), keys and queries of p, plus a tile of slack, fit in int32.
inline bool fits_int32_indices(const AttentionParams& p) {
  const int64_t limit = (int64_t{1} << 31) - 1024;
  return p.Hkv > 0 && p.Hq / p.Hkv * p.Tq < limit && p.Tk < limit && p.Tq < limit &&
         (p.window <= 0 || p.window < limit);
}

__host__ __device__ __forceinline__ int ceil_div32(int a, int b) { return (a + b - 1) / b; }

// The first key query position i may see, in 32 bits (window > 0 only; the window is clamped to
// Tk + 1 by the caller so the difference cannot overflow).
__device__ __forceinline__ int first_key32(int i, int offset, int window) {
  const int first = i + offset - window + 1;
  return first > 0 ? first : 0;
}

// key_tiles() in 32 bits, with the window a compile-time choice.
template <bool CAUSAL, bool WINDOW>
__device__ __forceinline__ TileRuns key_tiles32(int Tq, int Tk, int window, int r0, int r_last,
                                                int BN) {
  const int n_all = ceil_div32(Tk, BN);
  if (!CAUSAL) return {0, n_all, n_all, n_all};
  const int offset = Tk - Tq;
  const int h0 = r0 / Tq, h1 = r_last / Tq;
  const int i0 = r0 - h0 * Tq, i1 = r_last - h1 * Tq;
  auto first_tile = [&](int i) { return WINDOW ? first_key32(i, offset, window) / BN : 0; };
  auto end_tile = [&](int i) { return ceil_div32(min(Tk, i + offset + 1), BN); };
  if (h0 == h1) {
    const int b = first_tile(i0), e = end_tile(i1);
    return {b, e, e, e};
  }
  if (h1 - h0 >= 2) return {first_tile(0), n_all, n_all, n_all};
  const int b_second = first_tile(0), e_second = end_tile(i1), b_first = first_tile(i0);
  if (e_second >= b_first) return {b_second, n_all, n_all, n_all};
  return {b_second, e_second, b_first, n_all};
}

// A compile-time bool as a value, to instantiate one loop body with and without its mask.
template <bool B>
struct BoolTag {
  static constexpr bool value = B;
};

}  // namespace gpu
}  // namespace minigpt
