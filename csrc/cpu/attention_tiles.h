// minigpt attention: the CPU tile code, written once for every vector width.
//
// csrc/attention_cpu.cpp includes this file once per instruction set, inside a namespace of its
// own that defines, before the #include:
//   kVecBytes  bytes per vector: 32 (portable, AVX2) or 64 (AVX-512)
//   kRowBlock  rows of the micro-kernel's register block
//   kColVecs   vectors of columns of that block
// and under `#pragma GCC target(...)` for the x86 paths, so that every function below (templates
// included) is compiled for that instruction set. No #include here: the enclosing file includes
// the headers this code uses, outside the target pragmas.
//
// Vectors are GCC/Clang vector extensions rather than intrinsics, so that the same source serves
// every width: inside the AVX-512 namespace a 64-byte vector is one zmm register, inside the AVX2
// one a 32-byte vector is one ymm register, and the portable build splits it into SSE2 halves
// (or NEON on ARM). a * b + c contracts to a fused multiply-add where the target has FMA.
//
// Every function taking or returning a vector lives in this namespace and is compiled for the
// same target, so the -Wpsabi note about vector arguments (silenced by the enclosing file) has
// no call that crosses an ABI boundary.
//
// The code is in three parts, included here in order: tile_vec.h (vectors, exp, tile
// products), tile_forward.h (forward and decode), tile_backward.h (backward); this file ends
// with the entry points the host drivers call. None of the parts has an include guard: each is
// meant to be included once per instruction-set namespace.

#include "cpu/tile_vec.h"
#include "cpu/tile_forward.h"
#include "cpu/tile_backward.h"

// ---------------------------------------------------------------------------------------------
// Entry points: the functions the host drivers call, one per (type, lse type). float32 gets
// compile-time head dims for the common sizes where kFixedHeadDims is set; float64 (gradcheck)
// and other head dims read p.D.

template <typename T, typename LseT>
void forward_entry(const AttentionParams& p, T* out, const Strides4& os, LseT* lse, T* scratch,
                   int64_t u0, int64_t u1) {
  if constexpr (std::is_same_v<T, float> && kFixedHeadDims) {
    switch (p.D) {
      case 32: return forward_units<T, LseT, 32>(p, out, os, lse, scratch, u0, u1);
      case 64: return forward_units<T, LseT, 64>(p, out, os, lse, scratch, u0, u1);
      case 128: return forward_units<T, LseT, 128>(p, out, os, lse, scratch, u0, u1);
      default: break;
    }
  }
  forward_units<T, LseT, 0>(p, out, os, lse, scratch, u0, u1);
}

template <typename T, typename LseT>
void decode_entry(const AttentionParams& p, const DecodeSplit& sp, T* out, const Strides4& os,
                  LseT* lse, T* part_acc, T* part_stat, T* scratch, int64_t u0, int64_t u1) {
#define MINIGPT_DECODE(kD) \
  decode_units<T, LseT, kD>(p, sp, out, os, lse, part_acc, part_stat, scratch, u0, u1)
  if constexpr (std::is_same_v<T, float> && kFixedHeadDims) {
    switch (p.D) {
      case 32: return MINIGPT_DECODE(32);
      case 64: return MINIGPT_DECODE(64);
      case 128: return MINIGPT_DECODE(128);
      default: break;
    }
  }
  MINIGPT_DECODE(0);
#undef MINIGPT_DECODE
}

template <typename T>
void backward_entry(const AttentionParams& p, const T* lse, const T* delta, T* dq_part,
                    T* scratch, int64_t pair_first, int64_t u0, int64_t u1) {
  if constexpr (std::is_same_v<T, float> && kFixedHeadDims) {
    switch (p.D) {
      case 32: return backward_units<T, 32>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
      case 64: return backward_units<T, 64>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
      case 128: return backward_units<T, 128>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
      default: break;
    }
  }
  backward_units<T, 0>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
}

// The entry points this file's callers take the address of, instantiated here so that they are
// compiled under the enclosing target pragma.
template void forward_entry<float, float>(const AttentionParams&, float*, const Strides4&, float*,
                                          float*, int64_t, int64_t);
template void forward_entry<double, float>(const AttentionParams&, double*, const Strides4&,
                                           float*, double*, int64_t, int64_t);
template void forward_entry<double, double>(const AttentionParams&, double*, const Strides4&,
                                            double*, double*, int64_t, int64_t);
template void decode_entry<float, float>(const AttentionParams&, const DecodeSplit&, float*,
                                         const Strides4&, float*, float*, float*, float*, int64_t,
                                         int64_t);
template void decode_entry<double, float>(const AttentionParams&, const DecodeSplit&, double*,
                                          const Strides4&, float*, double*, double*, double*,
                                          int64_t, int64_t);
template void decode_entry<double, double>(const AttentionParams&, const DecodeSplit&, double*,
                                           const Strides4&, double*, double*, double*, double*,
                                           int64_t, int64_t);
template void backward_entry<float>(const AttentionParams&, const float*, const float*, float*,
                                    float*, int64_t, int64_t, int64_t);
template void backward_entry<double>(const AttentionParams&, const double*, const double*,
                                     double*, double*, int64_t, int64_t, int64_t);
