// minigpt attention, CPU: the tile code compiled once per instruction set (portable, AVX2+FMA,
// AVX-512), and the run-time choice among them (MINIGPT_CPU_ISA). Included once by
// attention_cpu.cpp, inside its anonymous namespace, after the scratch-size helpers and
// DecodeSplit that the tile code uses; no standard headers are included here.
//
#pragma once
// ---------------------------------------------------------------------------------------------
// The tile code, once per instruction set (see "Vectorisation" in attention_cpu.cpp).

namespace portable {
constexpr int kVecBytes = 32;
constexpr int kRowBlock = 6;
constexpr int kColVecs = 2;
constexpr bool kFixedHeadDims = false;  // the fallback: fewer instantiations, run-time head dim
#include "cpu/attention_tiles.h"
}  // namespace portable

#if defined(__x86_64__) || defined(__i386__)
#define MINIGPT_HAVE_X86_PATHS 1

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
constexpr int kVecBytes = 32;
// 12 of the 16 ymm registers hold C; the rest two rows of B and one broadcast of A.
constexpr int kRowBlock = 6;
constexpr int kColVecs = 2;
constexpr bool kFixedHeadDims = true;
#include "cpu/attention_tiles.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif
namespace avx512 {
constexpr int kVecBytes = 64;
// 24 of the 32 zmm registers hold C; the rest four vectors of B and one broadcast of A. 6 x 4
// covers a 64-column score tile in one panel with one broadcast per 4 FMAs; 12 x 2 and 8 x 3
// measured no faster (single thread, T = 1024, D = 64 and 128, within 5% of each other).
constexpr int kRowBlock = 6;
constexpr int kColVecs = 4;
constexpr bool kFixedHeadDims = true;
#include "cpu/attention_tiles.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // x86

// ---------------------------------------------------------------------------------------------
// Instruction-set choice.

enum class Isa { Portable = 0, Avx2 = 1, Avx512 = 2 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2+fma";
    default: return "portable";
  }
}

// The best path this CPU can run. __builtin_cpu_supports also checks that the operating system
// saves the wider registers (XGETBV), so a "yes" never leads to SIGILL.
Isa best_isa() {
#ifdef MINIGPT_HAVE_X86_PATHS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (avx2) return Isa::Avx2;
#endif
  return Isa::Portable;
}

// The path in use: the best the CPU has, or the one MINIGPT_CPU_ISA names (avx512, avx2 or
// portable; unset or empty means the best). A path the CPU lacks falls back to the best it has,
// with a warning; any other value is an error. Read once per process.
Isa select_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("MINIGPT_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want;
  if (std::strcmp(env, "avx512") == 0) {
    want = Isa::Avx512;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = Isa::Avx2;
  } else if (std::strcmp(env, "portable") == 0) {
    want = Isa::Portable;
  } else {
    TORCH_CHECK(false, "MINIGPT_CPU_ISA='", env,
                "' is not one of avx512, avx2, portable (unset it for the best this CPU has)");
  }
  if (static_cast<int>(want) > static_cast<int>(best)) {
    TORCH_WARN("MINIGPT_CPU_ISA=", env, ": this CPU lacks it; using ", isa_name(best));
    return best;
  }
  return want;
}

Isa cpu_isa() {
  static const Isa isa = select_isa();  // a throw leaves it unset, to throw again next call
  return isa;
}

// The chosen path's entry points. Call these on the op's own thread, before a parallel region:
// the first call reads MINIGPT_CPU_ISA and may throw.
template <typename T, typename LseT>
auto forward_kernel() {
#ifdef MINIGPT_HAVE_X86_PATHS
  switch (cpu_isa()) {
    case Isa::Avx512: return &avx512::forward_entry<T, LseT>;
    case Isa::Avx2: return &avx2::forward_entry<T, LseT>;
    default: break;
  }
#endif
  return &portable::forward_entry<T, LseT>;
}

template <typename T, typename LseT>
auto decode_kernel() {
#ifdef MINIGPT_HAVE_X86_PATHS
  switch (cpu_isa()) {
    case Isa::Avx512: return &avx512::decode_entry<T, LseT>;
    case Isa::Avx2: return &avx2::decode_entry<T, LseT>;
    default: break;
  }
#endif
  return &portable::decode_entry<T, LseT>;
}

template <typename T>
auto backward_kernel() {
#ifdef MINIGPT_HAVE_X86_PATHS
  switch (cpu_isa()) {
    case Isa::Avx512: return &avx512::backward_entry<T>;
    case Isa::Avx2: return &avx2::backward_entry<T>;
    default: break;
  }
#endif
  return &portable::backward_entry<T>;
}


