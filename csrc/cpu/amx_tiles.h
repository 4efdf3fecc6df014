// minigpt attention, CPU bfloat16: tile products on AMX (Intel Advanced Matrix Extensions,
// Sapphire Rapids and later), for CPUs and kernels that have them. Included once by
// attention_cpu_bf16.cpp inside its anonymous namespace, after cpu/bf16_dot_tiles.h, whose
// operand layouts it reads unchanged.
//
// tdpbf16ps multiplies a 16 x 32 bf16 tile A (16 rows of 64 bytes) by a 32 x 16 bf16 tile B held
// in pairs of rows (16 rows of 16 words, word (kp, n) = (B[2kp][n], B[2kp+1][n])) and adds the
// 16 x 16 float32 products to C (Intel 64 and IA-32 Architectures Software Developer's Manual,
// vol. 2, TDPBF16PS). That is the layout dpbf16::gemm already reads (bf16_dot_tiles.h: A as
// 32-bit words, B packed in pairs), so amx::gemm takes the same arguments and the same row
// limits: the whole 16 x 16 tiles of C over whole steps of 16 pairs run on AMX, in blocks of
// 2 x 2 tiles (4 accumulators, 2 A and 2 B tiles: the 8 tile registers); the rows, columns and
// pairs past the last whole tile run on dpbf16::gemm.
//
// The tile registers are per thread and must be configured before use: a worker holds an
// amx::Session (below) around its tile products, which loads our configuration and releases the
// tiles when it ends, so that code running later on the thread (oneDNN configures its own) finds
// them released. Linux gives a process the tile registers' state only after it asks
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); cpu_has_amx_bf16() asks once.
#pragma once

// The AMX intrinsics came with GCC 11 and Clang 12; older compilers build the kernels without
// this path.
#if defined(__x86_64__) && defined(__linux__) &&                            \
    ((defined(__clang__) && __clang_major__ >= 12) ||                     \
     (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11))
#define MINIGPT_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

// Whether this CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use them.
bool cpu_has_amx_bf16() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
    if (!amx_bf16 || !amx_tile) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")
#endif
namespace amx {

// The tile configuration (ldtilecfg's 64-byte operand): palette 1, the 8 tiles at 16 rows of
// 64 bytes each.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// The tile registers configured for amx::gemm while it lives (on = false: nothing), released
// at the end. One per worker, on the thread that runs the products.
class Session {
 public:
  explicit Session(bool on) : on_(on) {
    if (on_) {
      static const TileConfig config;
      _tile_loadconfig(&config);
    }
  }
  ~Session() {
    if (on_) _tile_release();
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

 private:
  bool on_;
};

// C tiles (MT x NT of 16 x 16, tile registers 0-3) of rows m, columns n (+)= A B over pairs
// [k0, k1), k0 and k1 multiples of 16. Tiles 4-5 hold A, 6-7 hold B.
template <int MT, int NT>
inline void block(int64_t k0, int64_t k1, const uint32_t* a, int64_t lda, const uint32_t* b,
                  int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 4, sb = ldb * 4, sc = ldc * 4;  // strides in bytes
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if constexpr (NT == 2) _tile_loadd(1, c + 16, sc);
    if constexpr (MT == 2) _tile_loadd(2, c + 16 * ldc, sc);
    if constexpr (MT == 2 && NT == 2) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  }
  for (int64_t k = k0; k < k1; k += 16) {
    _tile_loadd(4, a + k, sa);
    _tile_loadd(6, b + k * ldb, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) {
      _tile_loadd(7, b + k * ldb + 16, sb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MT == 2) {
      _tile_loadd(5, a + 16 * lda + k, sa);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if constexpr (NT == 2) _tile_stored(1, c + 16, sc);
  if constexpr (MT == 2) _tile_stored(2, c + 16 * ldc, sc);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, c + 16 * ldc + 16, sc);
}

// dpbf16::gemm's product (same arguments, same row limits) with its whole tiles on AMX; needs a
// live Session on this thread. C[M x N] (+)= A B over Kp pairs.
void gemm(int64_t M, int64_t N, int64_t Kp, const uint32_t* a, int64_t lda, const uint32_t* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate,
          const dpbf16::RowLimits& lim = {}) {
  const int64_t M16 = M / 16 * 16, N16 = N / 16 * 16, K16 = Kp / 16 * 16;
  if (M16 == 0 || N16 == 0 || K16 == 0)
    return dpbf16::gemm(M, N, Kp, a, lda, b, ldb, c, ldc, accumulate, lim);
  for (int64_t m = 0; m < M16; m += 32) {
    const int mt = M16 - m >= 32 ? 2 : 1;
    // The union of the block's rows' limits: columns up to a whole tile, pairs out to whole
    // steps of 16 (the pairs added outside a row's range are zeros of A).
    int64_t n_hi = lim.n_end ? 0 : N16, k0 = lim.kp_begin ? K16 : 0, k1 = lim.kp_end ? 0 : K16;
    for (int64_t r = m; r < m + 16 * mt; ++r) {
      if (lim.n_end) n_hi = std::max<int64_t>(n_hi, lim.n_end[r]);
      if (lim.kp_begin) k0 = std::min<int64_t>(k0, lim.kp_begin[r]);
      if (lim.kp_end) k1 = std::max<int64_t>(k1, lim.kp_end[r]);
    }
    n_hi = std::min(N16, (n_hi + 15) / 16 * 16);
    k0 = std::clamp<int64_t>(k0, 0, K16) / 16 * 16;
    k1 = std::clamp<int64_t>((k1 + 15) / 16 * 16, k0, K16);
    const uint32_t* am = a + m * lda;
    float* cm = c + m * ldc;
    for (int64_t n = 0; n < n_hi; n += 32) {
      const bool two = n_hi - n >= 32;
      if (mt == 2 && two)
        block<2, 2>(k0, k1, am, lda, b + n, ldb, cm + n, ldc, accumulate);
      else if (mt == 2)
        block<2, 1>(k0, k1, am, lda, b + n, ldb, cm + n, ldc, accumulate);
      else if (two)
        block<1, 2>(k0, k1, am, lda, b + n, ldb, cm + n, ldc, accumulate);
      else
        block<1, 1>(k0, k1, am, lda, b + n, ldb, cm + n, ldc, accumulate);
    }
  }
  // The rest on AVX512-BF16: the pairs past K16 over the whole tiles (added; the pair limits
  // are left out there, since the zeros of A outside them add nothing), the columns past N16
  // of the tiles' rows, and the rows past M16.
  const dpbf16::RowLimits cols_only{lim.n_end, nullptr, nullptr};
  if (K16 < Kp)
    dpbf16::gemm(M16, N16, Kp - K16, a + K16, lda, b + K16 * ldb, ldb, c, ldc, true, cols_only);
  // (The column limits count from column 0, not N16: there they only let a block of rows that
  // reads none of the last columns compute them anyway, at most 15 a row.)
  if (N16 < N)
    dpbf16::gemm(M16, N - N16, Kp, a, lda, b + N16, ldb, c + N16, ldc, accumulate, lim);
  if (M16 < M) {
    const dpbf16::RowLimits rest{lim.n_end ? lim.n_end + M16 : nullptr,
                                 lim.kp_begin ? lim.kp_begin + M16 : nullptr,
                                 lim.kp_end ? lim.kp_end + M16 : nullptr};
    dpbf16::gemm(M - M16, N, Kp, a + M16 * lda, lda, b, ldb, c + M16 * ldc, ldc, accumulate,
                 rest);
  }
}

}  // namespace amx
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else
// Elsewhere (or with an older compiler) the path is never chosen (cpu_has_amx_bf16() is false);
// these keep its call sites free of #ifdefs.
bool cpu_has_amx_bf16() { return false; }
namespace amx {
class Session {
 public:
  explicit Session(bool) {}
};
inline void gemm(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t,
                 float*, int64_t, bool, const dpbf16::RowLimits& = {}) {
  TORCH_CHECK(false, "minigpt: AMX tiles are not built for this CPU");
}
}  // namespace amx
#endif
