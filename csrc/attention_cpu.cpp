// minigpt attention: CPU forward and backward kernels (float32 and float64).
//
// FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and
// Work Partitioning"). With S = scale * Q K^T (causal entries set to -inf), P = softmax_rows(S):
//
//   Forward, Alg. 1. For one tile of query rows, visit the key tiles j in order and keep per row
//   a running max m, a running denominator l and an unnormalised output O~:
//     m_j  = max(m_{j-1}, rowmax(S_j))
//     P~_j = exp(S_j - m_j)
//     l_j  = exp(m_{j-1} - m_j) l_{j-1} + rowsum(P~_j)
//     O~_j = exp(m_{j-1} - m_j) O~_{j-1} + P~_j V_j
//   and finish with O = O~ / l and lse = m + log(l), the natural-log log-sum-exp of the row.
//
//   Backward, Alg. 2. With delta = rowsum(dO * O) and P rebuilt tile by tile from lse:
//     P_ij  = exp(S_ij - lse_i)
//     dV_j += P_ij^T dO_i          dP_ij = dO_i V_j^T
//     dS_ij = P_ij * (dP_ij - delta_i)
//     dQ_i += scale dS_ij K_j      dK_j += scale dS_ij^T Q_i
//
// Neither pass forms the (Tq, Tk) score matrix: each thread holds a few tiles of at most
// kBlockQ x kBlockK scores, so memory stays linear in sequence length.
//
// Work split. Decode steps (Tq <= 4 query rows against many keys) take their own path, split over
// the keys (flash-decoding; see "Decode" below). Otherwise the forward runs one work unit per
// (batch, query head, query tile). The backward follows Alg. 2's outer loop over key tiles: one
// unit per (batch, kv head, key tile) owns its rows of dK and dV (summed over the query heads of
// its group, for grouped-query attention), so they need no synchronisation. dQ gathers
// contributions from every key tile; each worker adds them into its own buffer and the buffers are
// summed in worker order at the end, which keeps the result deterministic for a given thread count
// while doing the five tile products of Alg. 2 only once. Units are cut into one contiguous range
// per worker by estimated cost, because causal tiles near the diagonal carry less work than the
// rest.
//
// Vectorisation. The hot loops are the five tile products, done by one register-blocked
// micro-kernel (kRowBlock rows x 2 vectors of columns held in registers across the inner loop),
// and exp. They are written with GCC/Clang vector extensions rather than intrinsics so that the
// same source compiles twice: inside functions marked target("avx2,fma") (selected at run time
// with __builtin_cpu_supports) it becomes 256-bit AVX2 code with fused multiply-adds (GCC and
// Clang contract a * b + c by default); elsewhere it becomes baseline SSE2 code that runs on any
// x86-64 (or NEON on ARM). Intrinsics could not be shared like that: GCC refuses to inline an AVX2 intrinsic into a function compiled without
// AVX2, and templates do not inherit a caller's target attribute. Everything below the two
// target-specific entry points is therefore force-inlined.
#include "attention.h"

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace minigpt {
namespace {

#define MINIGPT_INLINE inline __attribute__((always_inline))

// Query rows and keys per tile. 64 x 64 float scores (16 KiB) plus the operand rows stay in the
// 32 KiB L1 data cache of current x86 cores.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
// Micro-kernel shape: kRowBlock rows x 2 vectors of C live in registers (12 of the 16 ymm
// registers for float on AVX2; the rest hold two rows of B and one broadcast of A).
constexpr int kRowBlock = 6;
constexpr int kColVecs = 2;

// ---------------------------------------------------------------------------------------------
// 256-bit vectors of float (8 lanes) or double (4 lanes) as compiler vector extensions.
//
// GCC warns (-Wpsabi) that passing 256-bit vectors by value differs between AVX and non-AVX
// calling conventions. Every function taking or returning one is force-inlined, so no such call
// survives to cross an ABI boundary; the warning does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = static_cast<int>(32 / sizeof(T));

typedef int32_t Int32x8 __attribute__((vector_size(32)));

template <typename T>
MINIGPT_INLINE Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load: tensor rows carry no alignment promise
  return v;
}
template <typename T>
MINIGPT_INLINE void vstore(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
// Broadcast. x - 0 is x for every x, so the compiler emits a bare broadcast; x + 0 would not do,
// since it turns -0.0 into +0.0 and must be kept as an addition.
template <typename T>
MINIGPT_INLINE Vec<T> vset(T x) {
  return x - Vec<T>{};
}
template <typename V>
MINIGPT_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// exp for float: Cephes expf (range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6
// polynomial and 2^n built in the exponent bits), about 1 ulp. Inputs below -87 (exp < 1.7e-38)
// give exactly 0, so masked scores (-inf) turn into zero probabilities; NaN propagates.
MINIGPT_INLINE Vec<float> vexp(Vec<float> x) {
  const Vec<float> lo = vset(-87.0f), hi = vset(88.0f);
  const Vec<float> xc = x < lo ? lo : (x > hi ? hi : x);
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in float arithmetic.
  const Vec<float> round_magic = vset(12582912.0f);
  const Vec<float> n = (xc * 1.44269504088896341f + round_magic) - round_magic;
  // ln2 split in a part exact in float and a remainder, so r keeps full precision.
  Vec<float> r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec<float> y = vset(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const Int32x8 bits = (__builtin_convertvector(n, Int32x8) + 127) << 23;
  Vec<float> two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const Vec<float> result = y * two_n;
  return x < lo ? vset(0.0f) : result;
}

// float64 exists for gradcheck, where accuracy matters and speed does not: use libm per lane.
MINIGPT_INLINE Vec<double> vexp(Vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

template <typename T>
MINIGPT_INLINE T softmax_scale(const AttentionParams& p) {
  if (std::is_same_v<T, double> && p.scale_fp64 != 0.0) return static_cast<T>(p.scale_fp64);
  return static_cast<T>(p.scale);
}

MINIGPT_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
MINIGPT_INLINE int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Scratch memory of n elements, uninitialised, from torch's CPU allocator rather than
// std::vector: torch.profiler's memory events (and so `python -m minigpt.profile`'s peak memory)
// count it beside the op's outputs, and an allocator installed in torch manages it too. The
// profiler only sees allocations made on the thread that called the op, so every buffer is
// allocated by the host drivers below, before their parallel regions, never by a worker.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : ptr_(c10::GetCPUAllocator()->allocate(static_cast<size_t>(n) * sizeof(T))) {}
  T* data() const { return static_cast<T*>(ptr_.get()); }

 private:
  c10::DataPtr ptr_;
};

// Per-worker tile buffers of the forward and the backward, in elements (layouts in
// forward_units and backward_units).
int64_t forward_tile_scratch(int64_t D) {
  return D * kBlockQ + kBlockK * kBlockQ + kBlockQ * D + 3 * kBlockQ;
}
int64_t backward_tile_scratch(int64_t D) {
  return 2 * D * kBlockK + 2 * kBlockQ * kBlockK + 2 * kBlockK * D;
}

// ---------------------------------------------------------------------------------------------
// Tile products C (+)= A B. B is row-major with unit column stride (row k at b + k * ldb), C is
// row-major (row m at c + m * ldc). A is either row-major, A(m, k) = a[m * lda + k], or read
// transposed, A(m, k) = a[k * lda + m], which gives P^T dO and dS^T Q straight from the P and dS
// tiles with no transpose copy: the micro-kernel only broadcasts single elements of A, so A's
// layout costs nothing.

enum class ALayout { RowMajor, Transposed };

template <ALayout L, typename T>
MINIGPT_INLINE const T* a_elem(const T* a, int64_t lda, int64_t m, int64_t k) {
  return L == ALayout::RowMajor ? a + m * lda + k : a + k * lda + m;
}

// Rows x (NV * lanes) block of C held in registers across the whole K loop: per step, NV vector
// loads of B and one broadcast of A per row feed Rows * NV fused multiply-adds.
template <typename T, int Rows, int NV, ALayout L>
MINIGPT_INLINE void micro_kernel(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
                                 T* c, int64_t ldc, bool accumulate) {
  constexpr int W = kLanes<T>;
  Vec<T> acc[Rows][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> bv[NV];
    for (int n = 0; n < NV; ++n) bv[n] = vload(b + k * ldb + n * W);
    for (int m = 0; m < Rows; ++m) {
      const T am = *a_elem<L>(a, lda, m, k);  // vector * scalar compiles to one broadcast
      for (int n = 0; n < NV; ++n) acc[m][n] += bv[n] * am;
    }
  }
  // C is added after the tile's own sum rather than used as its starting value: long sums (dV
  // of an early key gathers every query row) then round as a sum of per-tile partial sums, which
  // keeps float32 error at the level of a blocked BLAS gemm instead of growing with Tq.
  for (int m = 0; m < Rows; ++m)
    for (int n = 0; n < NV; ++n) {
      if (accumulate) acc[m][n] += vload(c + m * ldc + n * W);
      vstore(c + m * ldc + n * W, acc[m][n]);
    }
}

// One column panel of NV vectors over all M rows: full row blocks, then the leftover rows.
template <typename T, int NV, ALayout L>
MINIGPT_INLINE void gemm_panel(int64_t M, int64_t K, const T* a, int64_t lda, const T* b,
                               int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock)
    micro_kernel<T, kRowBlock, NV, L>(K, a_elem<L>(a, lda, m, 0), lda, b, ldb, c + m * ldc, ldc,
                                      accumulate);
  const T* am = a_elem<L>(a, lda, m, 0);
  T* cm = c + m * ldc;
  static_assert(kRowBlock == 6, "the leftover-row switch below assumes 6-row blocks");
  switch (M - m) {
    case 5: micro_kernel<T, 5, NV, L>(K, am, lda, b, ldb, cm, ldc, accumulate); break;
    case 4: micro_kernel<T, 4, NV, L>(K, am, lda, b, ldb, cm, ldc, accumulate); break;
    case 3: micro_kernel<T, 3, NV, L>(K, am, lda, b, ldb, cm, ldc, accumulate); break;
    case 2: micro_kernel<T, 2, NV, L>(K, am, lda, b, ldb, cm, ldc, accumulate); break;
    case 1: micro_kernel<T, 1, NV, L>(K, am, lda, b, ldb, cm, ldc, accumulate); break;
    default: break;
  }
}

// C[M x N] (+)= A[M x K] B[K x N].
template <typename T, ALayout L>
MINIGPT_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b,
                         int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int W = kLanes<T>;
  int64_t n = 0;
  for (; n + kColVecs * W <= N; n += kColVecs * W)
    gemm_panel<T, kColVecs, L>(M, K, a, lda, b + n, ldb, c + n, ldc, accumulate);
  for (; n + W <= N; n += W) gemm_panel<T, 1, L>(M, K, a, lda, b + n, ldb, c + n, ldc, accumulate);
  // Columns past the last full vector appear only for head dims that are not a multiple of the
  // lane count (the score tiles are padded to whole vectors); plain scalar code is enough there.
  for (; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      T sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += *a_elem<L>(a, lda, m, k) * b[k * ldb + n];
      c[m * ldc + n] = accumulate ? c[m * ldc + n] + sum : sum;
    }
}

// ---------------------------------------------------------------------------------------------
// Work partition.

// Cuts units [0, n) into at most `workers` contiguous ranges of near-equal total cost; returns
// the range bounds (size ranges + 1). Deterministic: depends only on the costs and the count.
std::vector<int64_t> split_by_cost(const int64_t* cost, int64_t n, int64_t workers) {
  workers = std::max<int64_t>(1, std::min(workers, n));
  int64_t total = 0;
  for (int64_t u = 0; u < n; ++u) total += cost[u];
  std::vector<int64_t> bounds{0};
  int64_t prefix = 0;
  for (int64_t u = 0; u < n; ++u) {
    const int64_t w = static_cast<int64_t>(bounds.size());
    // Close range w-1 before unit u once the prefix reaches w/workers of the total.
    if (w < workers && prefix * workers >= w * total && u > bounds.back()) bounds.push_back(u);
    prefix += cost[u];
  }
  bounds.push_back(n);
  return bounds;
}

// Runs body(w, bounds[w], bounds[w + 1]) for every range, one range per thread.
template <typename F>
void run_ranges(const std::vector<int64_t>& bounds, const F& body) {
  const int64_t ranges = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, ranges, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) body(w, bounds[w], bounds[w + 1]);
  });
}

// Keys [0, visible_key_end) are visible to some row of the query tile starting at r0 with nr rows.
int64_t visible_key_end(const AttentionParams& p, int64_t r0, int64_t nr) {
  if (!p.causal) return p.Tk;
  return std::clamp<int64_t>(r0 + nr + p.causal_offset(), 0, p.Tk);
}

// First query tile with a row that sees key j0 (without a window, query tiles from there on see
// it too).
int64_t first_query_tile(const AttentionParams& p, int64_t j0) {
  if (!p.causal) return 0;
  return std::max<int64_t>(0, j0 - p.causal_offset()) / kBlockQ;
}

// One past the last query tile with a row that sees a key of [j0, j0 + nk): a window hides key j
// from the rows more than window - 1 positions after it.
int64_t query_tile_end(const AttentionParams& p, int64_t j0, int64_t nk) {
  const int64_t tiles = ceil_div(p.Tq, kBlockQ);
  if (p.window <= 0) return tiles;
  const int64_t last_row = j0 + nk - 1 - p.causal_offset() + p.window - 1;
  return last_row < 0 ? 0 : std::min(tiles, last_row / kBlockQ + 1);
}

// ALiBi (Press et al. 2022): head h's score of query row i and key j becomes
// scale * s - slope * (i + causal_offset() - j). The kernels apply it to a tile of raw scores s
// in place, scale included, and then use a scale of 1 for that tile.
template <typename T>
MINIGPT_INLINE T alibi_score(T s, T scale, T slope, int64_t distance) {
  return s * scale - slope * static_cast<T>(distance);
}

// ---------------------------------------------------------------------------------------------
// Forward (Alg. 1) for units [u0, u1), unit = (b * Hq + h) * query_tiles + i, with this worker's
// forward_tile_scratch(D) elements at scratch. kD > 0 fixes the head dim at compile time so the
// loops over it have constant trip counts; kD == 0 reads p.D.
// The scores are computed transposed, S^T = K_j Q_i^T (keys x queries), so the online
// softmax runs down columns and every query row's max and sum live in one vector lane: no
// horizontal reductions. The scale is applied exactly as the backward applies it when it
// rebuilds P from lse (s * scale - lse), so that both passes round the scores alike. O~ += P V_j then reads P^T through the transposed A layout.
template <typename T, typename LseT, int kD>
MINIGPT_INLINE void forward_units(const AttentionParams& p, T* out, const Strides4& os, LseT* lse,
                                  T* scratch, int64_t u0, int64_t u1) {
  constexpr int W = kLanes<T>;
  const int64_t D = kD > 0 ? kD : p.D;
  const int64_t G = p.group_size();
  const int64_t query_tiles = ceil_div(p.Tq, kBlockQ);
  const T scale = softmax_scale<T>(p);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  std::fill(scratch, scratch + forward_tile_scratch(D), T(0));
  T* qt = scratch;                  // (D, kBlockQ): Q_i^T, zero-padded columns
  T* st = qt + D * kBlockQ;         // (kBlockK, kBlockQ): S^T, then P~^T in place
  T* acc = st + kBlockK * kBlockQ;  // (kBlockQ, D): O~
  T* row_max = acc + kBlockQ * D;
  T* row_sum = row_max + kBlockQ;
  T* rescale = row_sum + kBlockQ;

  for (int64_t u = u0; u < u1; ++u) {
    const int64_t i = u % query_tiles;
    const int64_t h = (u / query_tiles) % p.Hq;
    const int64_t b = u / (query_tiles * p.Hq);
    const int64_t r0 = i * kBlockQ;
    const int64_t nr = std::min(kBlockQ, p.Tq - r0);
    const int64_t nr_pad = round_up(nr, W);  // query columns of S^T, whole vectors
    const T* qi = q + b * p.q_stride.b + h * p.q_stride.h + r0 * p.q_stride.t;
    const T* kh = k + b * p.k_stride.b + (h / G) * p.k_stride.h;
    const T* vh = v + b * p.v_stride.b + (h / G) * p.v_stride.h;

    for (int64_t d = 0; d < D; ++d) {
      for (int64_t r = 0; r < nr; ++r) qt[d * kBlockQ + r] = qi[r * p.q_stride.t + d];
      for (int64_t r = nr; r < nr_pad; ++r) qt[d * kBlockQ + r] = T(0);
    }
    std::fill(row_max, row_max + nr_pad, neg_inf);
    std::fill(row_sum, row_sum + nr_pad, T(0));
    std::fill(acc, acc + nr * D, T(0));

    // Keys [key_begin, key_end) are visible to some row of the tile: with a window, the key
    // tiles before the first row's window are never visited, so the cost is ~ Tq * window.
    const int64_t key_end = visible_key_end(p, r0, nr);
    const int64_t key_begin = p.first_key(r0);
    const bool alibi = p.alibi_slopes != nullptr;
    const T slope = alibi ? static_cast<T>(p.alibi_slopes[h]) : T(0);
    const Vec<T> score_scale = vset(alibi ? T(1) : scale);  // ALiBi tiles come scaled
    for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, key_end - j0);
      gemm<T, ALayout::RowMajor>(nk, nr_pad, D, kh + j0 * p.k_stride.t, p.k_stride.t, qt, kBlockQ,
                                 st, kBlockQ, false);
      if (alibi) {
        for (int64_t kk = 0; kk < nk; ++kk)
          for (int64_t r = 0; r < nr_pad; ++r)
            st[kk * kBlockQ + r] = alibi_score(st[kk * kBlockQ + r], scale, slope,
                                               r0 + r + p.causal_offset() - j0 - kk);
      }
      // Causal mask, only on tiles that cross the diagonal: key j0 + kk is visible to query
      // r0 + r iff r >= j0 + kk - offset - r0.
      if (p.causal && j0 + nk - 1 > r0 + p.causal_offset()) {
        for (int64_t kk = 0; kk < nk; ++kk) {
          const int64_t first_visible = std::clamp<int64_t>(j0 + kk - p.causal_offset() - r0, 0,
                                                            nr_pad);
          std::fill(st + kk * kBlockQ, st + kk * kBlockQ + first_visible, neg_inf);
        }
      }
      // Window mask, only on tiles that start before the last row's window: key j0 + kk is
      // hidden from query r0 + r iff r >= j0 + kk - offset + window - r0.
      if (p.window > 0 && j0 < p.first_key(r0 + nr - 1)) {
        for (int64_t kk = 0; kk < nk; ++kk) {
          const int64_t first_hidden = std::clamp<int64_t>(
              j0 + kk - p.causal_offset() + p.window - r0, 0, nr_pad);
          std::fill(st + kk * kBlockQ + first_hidden, st + kk * kBlockQ + nr_pad, neg_inf);
        }
      }
      for (int64_t c = 0; c < nr_pad; c += W) {
        const Vec<T> m_old = vload(row_max + c);
        Vec<T> m_new = m_old;
        for (int64_t kk = 0; kk < nk; ++kk)
          m_new = vmax(m_new, vload(st + kk * kBlockQ + c) * score_scale);
        // A row that has seen only masked keys keeps m = -inf; subtracting 0 instead of -inf
        // keeps its probabilities at exp(-inf) = 0 rather than NaN.
        const Vec<T> m_safe = m_new == neg_inf ? Vec<T>{} : m_new;
        const Vec<T> alpha = vexp(m_old - m_safe);
        Vec<T> sum{};
        for (int64_t kk = 0; kk < nk; ++kk) {
          const Vec<T> pk = vexp(vload(st + kk * kBlockQ + c) * score_scale - m_safe);
          vstore(st + kk * kBlockQ + c, pk);
          sum += pk;
        }
        vstore(row_sum + c, alpha * vload(row_sum + c) + sum);
        vstore(row_max + c, m_new);
        vstore(rescale + c, alpha);
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= rescale[r];
      gemm<T, ALayout::Transposed>(nr, D, nk, st, kBlockQ, vh + j0 * p.v_stride.t, p.v_stride.t,
                                   acc, D, true);
    }

    T* oi = out + b * os.b + h * os.h + r0 * os.t;
    LseT* lse_i = lse + (b * p.Hq + h) * p.Tq + r0;
    for (int64_t r = 0; r < nr; ++r) {
      // l == 0 only for a row with no visible key: define its output as 0 and its lse as -inf.
      const T l = row_sum[r];
      const T inv = l > T(0) ? T(1) / l : T(0);
      for (int64_t d = 0; d < D; ++d) oi[r * os.t + d] = acc[r * D + d] * inv;
      lse_i[r] = static_cast<LseT>(l > T(0) ? row_max[r] + std::log(l) : neg_inf);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decode: a few query rows against many keys (flash-decoding; Dao, Haziza, Massa and Sizov 2023,
// "Flash-Decoding for long-context inference"). A decode step (Tq == 1) is a memory-bound read
// of K and V: the tiled forward above would pad its single query row to a whole vector of query
// columns, read K by scalar broadcasts and keep one head on one thread. Here the keys of each
// (batch, kv head) are cut into chunks; one work unit handles one chunk for all G * Tq query rows
// of that kv head (so K and V are read once per kv head, also under GQA), vectorised over the
// head dim. Each unit keeps Alg. 1's running max m, sum l and output O~ per row over its chunk;
// with several chunks the partial results are merged by their log-sum-exp afterwards:
//   M = max_c m_c,  L = sum_c exp(m_c - M) l_c,  O = sum_c exp(m_c - M) O~_c / L,  lse = M + log L.

// Query rows per head up to which the decode path runs (above it, the tiled forward's query
// tiles fill its vectors and do fewer operations per key).
constexpr int64_t kDecodeMaxTq = 4;
// Keys per tile: K and V of a 32-key tile (16 KiB for D = 64 in float) stay in L1 while every
// query row of the kv head reads them.
constexpr int64_t kDecodeBlockK = 32;
// Fewest keys per chunk: below this, merging partial results costs more than the split saves.
constexpr int64_t kDecodeMinChunk = 256;

bool use_decode_path(const AttentionParams& p) {
  return p.Tq > 0 && p.Tq <= kDecodeMaxTq && p.Tk > 0;
}

// How the keys are cut: chunks per (batch, kv head) and keys per chunk.
struct DecodeSplit {
  int64_t key_begin = 0;  // first key any row sees (a window hides the ones before)
  int64_t chunks = 1;
  int64_t chunk_len = 0;
  int64_t rows = 0;  // query rows per kv head, G * Tq; row r is (g, t) = (r / Tq, r % Tq)
};

// Enough units for about four per thread (so that unequal chunks still balance), but no chunk
// shorter than kDecodeMinChunk keys. Depends on the thread count only through `threads`.
DecodeSplit decode_split(const AttentionParams& p, int64_t threads) {
  DecodeSplit s;
  const int64_t pairs = p.B * p.Hkv;
  const int64_t wanted = ceil_div(4 * threads, pairs);
  s.key_begin = p.first_key(0);
  const int64_t keys = p.Tk - s.key_begin;  // >= 1: every row sees at least itself
  s.chunks = std::max<int64_t>(1, std::min(wanted, keys / kDecodeMinChunk));
  s.chunk_len = ceil_div(keys, s.chunks);
  s.chunks = ceil_div(keys, s.chunk_len);
  s.rows = p.group_size() * p.Tq;
  return s;
}

int64_t decode_tile_scratch(const DecodeSplit& s, int64_t D) {
  return s.rows * (kDecodeBlockK + D + 2);
}

// sum_lanes(a)[i] = the sum of the lanes of a[i]: W vectors reduced to one in log2(W) rounds of
// pairwise shuffles and adds (the transpose-and-add of a horizontal reduction), instead of W
// separate horizontal sums. Compilers without __builtin_shufflevector (GCC < 12) sum lane by lane.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define MINIGPT_HAVE_SHUFFLEVECTOR 1
#endif
#endif
template <typename T>
MINIGPT_INLINE Vec<T> sum_lanes(const Vec<T> (&a)[kLanes<T>]) {
#ifdef MINIGPT_HAVE_SHUFFLEVECTOR
  if constexpr (std::is_same_v<T, float>) {
    Vec<T> s[4], t[2];
    for (int i = 0; i < 4; ++i)  // s[i]: lanes 2m, 2m+1 hold a[2i], a[2i+1] summed over a lane pair
      s[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; ++i)  // t[i]: lanes e and 4 + e hold a[4i + e] summed over each half
      t[i] = __builtin_shufflevector(s[2 * i], s[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
             __builtin_shufflevector(s[2 * i], s[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(t[0], t[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(t[0], t[1], 4, 5, 6, 7, 12, 13, 14, 15);
  } else {
    Vec<T> s[2];
    for (int i = 0; i < 2; ++i)
      s[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 4, 2, 6) +
             __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 5, 3, 7);
    return __builtin_shufflevector(s[0], s[1], 0, 1, 4, 5) +
           __builtin_shufflevector(s[0], s[1], 2, 3, 6, 7);
  }
#else
  Vec<T> r;
  for (int i = 0; i < kLanes<T>; ++i) {
    T s = 0;
    for (int l = 0; l < kLanes<T>; ++l) s += a[i][l];
    r[i] = s;
  }
  return r;
#endif
}

template <typename T>
MINIGPT_INLINE T max_lane(Vec<T> v) {
  T m = v[0];
  for (int i = 1; i < kLanes<T>; ++i) m = std::max(m, v[i]);
  return m;
}

// s[0 .. n) = scale * (q . k_j) for the keys j = 0 .. n of a tile (key j at k + j * ldk), in
// groups of W keys; lanes past n in the last group are -inf. The last group reads key n - 1 in
// place of the missing keys, so nothing past the tile is touched.
template <typename T, int kD>
MINIGPT_INLINE void decode_scores(int64_t D, const T* q, const T* k, int64_t ldk, int64_t n,
                                  T scale, T* s) {
  constexpr int W = kLanes<T>;
  const int64_t nvec = D / W;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    Vec<T> acc[W];
    for (int i = 0; i < W; ++i) {
      const T* kj = k + std::min<int64_t>(j0 + i, n - 1) * ldk;
      Vec<T> a{};
      if constexpr (kD > 0) {
        for (int64_t d = 0; d < kD / W; ++d) a += vload(q + d * W) * vload(kj + d * W);
      } else {
        for (int64_t d = 0; d < nvec; ++d) a += vload(q + d * W) * vload(kj + d * W);
        for (int64_t d = nvec * W; d < D; ++d) a[0] += q[d] * kj[d];  // D % W leftovers
      }
      acc[i] = a;
    }
    Vec<T> sv = sum_lanes<T>(acc) * scale;
    for (int i = 0; i < W; ++i)
      if (j0 + i >= n) sv[i] = neg_inf;
    vstore(s + j0, sv);
  }
}

// acc[0 .. D) = alpha * acc + sum_j p[j] v_j over the keys j = 0 .. n of a tile (key j at
// v + j * ldv).
template <typename T, int kD>
MINIGPT_INLINE void decode_accumulate(int64_t D, const T* p, const T* v, int64_t ldv, int64_t n,
                                      T alpha, T* acc) {
  constexpr int W = kLanes<T>;
  if constexpr (kD > 0) {
    Vec<T> o[kD / W];  // the row's output lives in registers across the tile's keys
    for (int d = 0; d < kD / W; ++d) o[d] = vload(acc + d * W) * alpha;
    for (int64_t j = 0; j < n; ++j) {
      const T pj = p[j];
      for (int d = 0; d < kD / W; ++d) o[d] += vload(v + j * ldv + d * W) * pj;
    }
    for (int d = 0; d < kD / W; ++d) vstore(acc + d * W, o[d]);
  } else {
    const int64_t nvec = D / W;
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    for (int64_t j = 0; j < n; ++j) {
      const T pj = p[j];
      const T* vj = v + j * ldv;
      for (int64_t d = 0; d < nvec; ++d)
        vstore(acc + d * W, vload(acc + d * W) + vload(vj + d * W) * pj);
      for (int64_t d = nvec * W; d < D; ++d) acc[d] += vj[d] * pj;
    }
  }
}

// Units [u0, u1), unit = (b * Hkv + kvh) * chunks + c, with this worker's decode_tile_scratch
// elements at scratch. With one chunk the rows are finished here (out, lse); otherwise each
// row's (O~, m, l) goes to part_acc / part_stat at index (unit * rows + r) for decode_merge.
template <typename T, typename LseT, int kD>
MINIGPT_INLINE void decode_units(const AttentionParams& p, const DecodeSplit& sp, T* out,
                                 const Strides4& os, LseT* lse, T* part_acc, T* part_stat,
                                 T* scratch, int64_t u0, int64_t u1) {
  constexpr int W = kLanes<T>;
  const int64_t D = kD > 0 ? kD : p.D;
  const int64_t G = p.group_size();
  const int64_t R = sp.rows;
  const T scale = softmax_scale<T>(p);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  T* scores = scratch;                    // (R, kDecodeBlockK): one tile's scores, then P~
  T* acc = scores + R * kDecodeBlockK;    // (R, D): O~
  T* row_max = acc + R * D;               // (R,)
  T* row_sum = row_max + R;               // (R,)

  for (int64_t u = u0; u < u1; ++u) {
    const int64_t c = u % sp.chunks;
    const int64_t pair = u / sp.chunks;
    const int64_t kvh = pair % p.Hkv;
    const int64_t b = pair / p.Hkv;
    const int64_t j_begin = sp.key_begin + c * sp.chunk_len;
    const int64_t j_end = std::min(p.Tk, j_begin + sp.chunk_len);
    const T* kh = k + b * p.k_stride.b + kvh * p.k_stride.h;
    const T* vh = v + b * p.v_stride.b + kvh * p.v_stride.h;
    std::fill(acc, acc + R * D, T(0));
    std::fill(row_max, row_max + R, neg_inf);
    std::fill(row_sum, row_sum + R, T(0));

    for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeBlockK) {
      const int64_t nk = std::min(kDecodeBlockK, j_end - j0);
      const T* kj = kh + j0 * p.k_stride.t;
      const T* vj = vh + j0 * p.v_stride.t;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r / p.Tq, t = r % p.Tq;
        // Query t sees keys first_key(t) <= j <= t + offset: a range of this tile, possibly
        // empty; keys lo .. hi of the tile.
        const int64_t hi =
            p.causal ? std::clamp<int64_t>(t + p.causal_offset() + 1 - j0, 0, nk) : nk;
        const int64_t lo = std::clamp<int64_t>(p.first_key(t) - j0, 0, nk);
        if (hi <= lo) continue;
        const int64_t n = hi - lo;
        const T* qr = q + b * p.q_stride.b + (kvh * G + g) * p.q_stride.h + t * p.q_stride.t;
        T* s = scores + r * kDecodeBlockK;
        decode_scores<T, kD>(D, qr, kj + lo * p.k_stride.t, p.k_stride.t, n, scale, s);
        if (p.alibi_slopes != nullptr) {
          const T slope = static_cast<T>(p.alibi_slopes[kvh * G + g]);
          for (int64_t i = 0; i < n; ++i)
            s[i] -= slope * static_cast<T>(t + p.causal_offset() - (j0 + lo + i));
        }
        const int64_t n_pad = round_up(n, W);
        Vec<T> mv = vload(s);
        for (int64_t i = W; i < n_pad; i += W) mv = vmax(mv, vload(s + i));
        const T m_old = row_max[r];
        const T m_new = std::max(m_old, max_lane<T>(mv));  // finite: n >= 1 visible key
        const T alpha = m_old == neg_inf ? T(0) : std::exp(m_old - m_new);
        Vec<T> sum{};
        for (int64_t i = 0; i < n_pad; i += W) {
          const Vec<T> pv = vexp(vload(s + i) - m_new);  // exp(-inf) = 0 past n
          vstore(s + i, pv);
          sum += pv;
        }
        T l = 0;
        for (int i = 0; i < W; ++i) l += sum[i];
        row_sum[r] = alpha * row_sum[r] + l;
        row_max[r] = m_new;
        decode_accumulate<T, kD>(D, s, vj + lo * p.v_stride.t, p.v_stride.t, n, alpha,
                                 acc + r * D);
      }
    }

    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r / p.Tq, t = r % p.Tq;
      const T* acc_r = acc + r * D;
      if (sp.chunks > 1) {
        T* pa = part_acc + (u * R + r) * D;
        std::copy(acc_r, acc_r + D, pa);
        part_stat[2 * (u * R + r)] = row_max[r];
        part_stat[2 * (u * R + r) + 1] = row_sum[r];
        continue;
      }
      const int64_t h = kvh * G + g;
      const T l = row_sum[r];
      const T inv = l > T(0) ? T(1) / l : T(0);  // no visible key: out 0, lse -inf
      T* o = out + b * os.b + h * os.h + t * os.t;
      for (int64_t d = 0; d < D; ++d) o[d] = acc_r[d] * inv;
      lse[(b * p.Hq + h) * p.Tq + t] =
          static_cast<LseT>(l > T(0) ? row_max[r] + std::log(l) : neg_inf);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward (Alg. 2) for units [u0, u1), unit = (b * Hkv + kvh) * key_tiles + j, with this
// worker's backward_tile_scratch(D) elements at scratch. dQ goes to dq_part, this worker's
// zero-filled buffer covering the (b, kv head) pairs from pair_first on, laid out
// (pair - pair_first, g, Tq, D).
template <typename T, int kD>
MINIGPT_INLINE void backward_units(const AttentionParams& p, const T* lse, const T* delta,
                                   T* dq_part, T* scratch, int64_t pair_first, int64_t u0,
                                   int64_t u1) {
  constexpr int W = kLanes<T>;
  const int64_t D = kD > 0 ? kD : p.D;
  const int64_t G = p.group_size();
  const int64_t key_tiles = ceil_div(p.Tk, kBlockK);
  const T scale = softmax_scale<T>(p);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);

  std::fill(scratch, scratch + backward_tile_scratch(D), T(0));
  T* kt = scratch;                   // (D, kBlockK): K_j^T, zero-padded columns
  T* vt = kt + D * kBlockK;          // (D, kBlockK): V_j^T
  T* pt = vt + D * kBlockK;          // (kBlockQ, kBlockK): S, then P
  T* ds = pt + kBlockQ * kBlockK;    // (kBlockQ, kBlockK): dP, then scale * dS
  T* dk_acc = ds + kBlockQ * kBlockK;  // (kBlockK, D)
  T* dv_acc = dk_acc + kBlockK * D;    // (kBlockK, D)

  for (int64_t u = u0; u < u1; ++u) {
    const int64_t j = u % key_tiles;
    const int64_t pair = u / key_tiles;
    const int64_t kvh = pair % p.Hkv;
    const int64_t b = pair / p.Hkv;
    const int64_t j0 = j * kBlockK;
    const int64_t nk = std::min(kBlockK, p.Tk - j0);
    const int64_t nk_pad = round_up(nk, W);
    const T* kj = k + b * p.k_stride.b + kvh * p.k_stride.h + j0 * p.k_stride.t;
    const T* vj = v + b * p.v_stride.b + kvh * p.v_stride.h + j0 * p.v_stride.t;

    for (int64_t d = 0; d < D; ++d) {
      for (int64_t c = 0; c < nk; ++c) {
        kt[d * kBlockK + c] = kj[c * p.k_stride.t + d];
        vt[d * kBlockK + c] = vj[c * p.v_stride.t + d];
      }
      for (int64_t c = nk; c < nk_pad; ++c) kt[d * kBlockK + c] = vt[d * kBlockK + c] = T(0);
    }
    std::fill(dk_acc, dk_acc + nk * D, T(0));
    std::fill(dv_acc, dv_acc + nk * D, T(0));

    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kvh * G + g;
      const int64_t row_base = (b * p.Hq + h) * p.Tq;
      T* dq_h = dq_part + ((pair - pair_first) * G + g) * p.Tq * D;
      const bool alibi = p.alibi_slopes != nullptr;
      const T slope = alibi ? static_cast<T>(p.alibi_slopes[h]) : T(0);
      const Vec<T> score_scale = vset(alibi ? T(1) : scale);  // as in the forward
      const int64_t tile_end = query_tile_end(p, j0, nk);
      for (int64_t i = first_query_tile(p, j0); i < tile_end; ++i) {
        const int64_t r0 = i * kBlockQ;
        const int64_t nr = std::min(kBlockQ, p.Tq - r0);
        const T* qi = q + b * p.q_stride.b + h * p.q_stride.h + r0 * p.q_stride.t;
        const T* doi = dout + b * p.dout_stride.b + h * p.dout_stride.h + r0 * p.dout_stride.t;

        gemm<T, ALayout::RowMajor>(nr, nk_pad, D, qi, p.q_stride.t, kt, kBlockK, pt, kBlockK,
                                   false);
        gemm<T, ALayout::RowMajor>(nr, nk_pad, D, doi, p.dout_stride.t, vt, kBlockK, ds, kBlockK,
                                   false);
        for (int64_t r = 0; r < nr; ++r) {
          const Vec<T> lse_r = vset(lse[row_base + r0 + r]);
          const Vec<T> delta_r = vset(delta[row_base + r0 + r]);
          T* p_row = pt + r * kBlockK;
          T* ds_row = ds + r * kBlockK;
          if (alibi) {
            for (int64_t c = 0; c < nk_pad; ++c)
              p_row[c] = alibi_score(p_row[c], scale, slope, r0 + r + p.causal_offset() - j0 - c);
          }
          for (int64_t c = 0; c < nk_pad; c += W) {
            const Vec<T> pv = vexp(vload(p_row + c) * score_scale - lse_r);
            vstore(p_row + c, pv);
            vstore(ds_row + c, pv * (vload(ds_row + c) - delta_r) * scale);
          }
          // Zero the padding columns and, on diagonal tiles, the keys this row may not see
          // (key j0 + c is visible to row r0 + r iff c <= r0 + r + offset - j0).
          // With a window, also the keys before the row's window (c < first_key - j0).
          const int64_t visible =
              p.causal ? std::clamp<int64_t>(r0 + r + p.causal_offset() - j0 + 1, 0, nk) : nk;
          std::fill(p_row + visible, p_row + nk_pad, T(0));
          std::fill(ds_row + visible, ds_row + nk_pad, T(0));
          if (p.window > 0) {
            const int64_t hidden = std::clamp<int64_t>(p.first_key(r0 + r) - j0, 0, visible);
            std::fill(p_row, p_row + hidden, T(0));
            std::fill(ds_row, ds_row + hidden, T(0));
          }
        }
        gemm<T, ALayout::Transposed>(nk, D, nr, pt, kBlockK, doi, p.dout_stride.t, dv_acc, D,
                                     true);
        gemm<T, ALayout::Transposed>(nk, D, nr, ds, kBlockK, qi, p.q_stride.t, dk_acc, D, true);
        gemm<T, ALayout::RowMajor>(nr, D, nk, ds, kBlockK, kj, p.k_stride.t, dq_h + r0 * D, D,
                                   true);
      }
    }

    T* dkj = dk + b * p.dk_stride.b + kvh * p.dk_stride.h + j0 * p.dk_stride.t;
    T* dvj = dv + b * p.dv_stride.b + kvh * p.dv_stride.h + j0 * p.dv_stride.t;
    for (int64_t c = 0; c < nk; ++c)
      for (int64_t d = 0; d < D; ++d) {
        dkj[c * p.dk_stride.t + d] = dk_acc[c * D + d];
        dvj[c * p.dv_stride.t + d] = dv_acc[c * D + d];
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Head-dim dispatch: compile-time head dims for the common sizes, a run-time one otherwise.

template <typename T, typename LseT>
MINIGPT_INLINE void forward_dispatch(const AttentionParams& p, T* out, const Strides4& os,
                                     LseT* lse, T* scratch, int64_t u0, int64_t u1) {
  switch (p.D) {
    case 32: return forward_units<T, LseT, 32>(p, out, os, lse, scratch, u0, u1);
    case 64: return forward_units<T, LseT, 64>(p, out, os, lse, scratch, u0, u1);
    case 128: return forward_units<T, LseT, 128>(p, out, os, lse, scratch, u0, u1);
    default: return forward_units<T, LseT, 0>(p, out, os, lse, scratch, u0, u1);
  }
}

template <typename T, typename LseT>
MINIGPT_INLINE void decode_dispatch(const AttentionParams& p, const DecodeSplit& sp, T* out,
                                    const Strides4& os, LseT* lse, T* part_acc, T* part_stat,
                                    T* scratch, int64_t u0, int64_t u1) {
#define MINIGPT_DECODE(kD) \
  decode_units<T, LseT, kD>(p, sp, out, os, lse, part_acc, part_stat, scratch, u0, u1)
  switch (p.D) {
    case 32: return MINIGPT_DECODE(32);
    case 64: return MINIGPT_DECODE(64);
    case 128: return MINIGPT_DECODE(128);
    default: return MINIGPT_DECODE(0);
  }
#undef MINIGPT_DECODE
}

template <typename T>
MINIGPT_INLINE void backward_dispatch(const AttentionParams& p, const T* lse, const T* delta,
                                      T* dq_part, T* scratch, int64_t pair_first, int64_t u0,
                                      int64_t u1) {
  switch (p.D) {
    case 32: return backward_units<T, 32>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
    case 64: return backward_units<T, 64>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
    case 128: return backward_units<T, 128>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
    default: return backward_units<T, 0>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
  }
}

// The entry points the code above is inlined into, once per instruction set. Portable code gets
// the run-time head dim only: it is the fallback, and float64 is for gradcheck.

template <typename T, typename LseT>
void forward_portable(const AttentionParams& p, T* out, const Strides4& os, LseT* lse, T* scratch,
                      int64_t u0, int64_t u1) {
  forward_units<T, LseT, 0>(p, out, os, lse, scratch, u0, u1);
}

template <typename T, typename LseT>
void decode_portable(const AttentionParams& p, const DecodeSplit& sp, T* out, const Strides4& os,
                     LseT* lse, T* part_acc, T* part_stat, T* scratch, int64_t u0, int64_t u1) {
  decode_units<T, LseT, 0>(p, sp, out, os, lse, part_acc, part_stat, scratch, u0, u1);
}

template <typename T>
void backward_portable(const AttentionParams& p, const T* lse, const T* delta, T* dq_part,
                       T* scratch, int64_t pair_first, int64_t u0, int64_t u1) {
  backward_units<T, 0>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
}

#if defined(__x86_64__) || defined(__i386__)
#define MINIGPT_HAVE_AVX2_PATH 1

__attribute__((target("avx2,fma"))) void forward_avx2(const AttentionParams& p, float* out,
                                                      const Strides4& os, float* lse,
                                                      float* scratch, int64_t u0, int64_t u1) {
  forward_dispatch<float, float>(p, out, os, lse, scratch, u0, u1);
}

__attribute__((target("avx2,fma"))) void decode_avx2(const AttentionParams& p,
                                                     const DecodeSplit& sp, float* out,
                                                     const Strides4& os, float* lse,
                                                     float* part_acc, float* part_stat,
                                                     float* scratch, int64_t u0, int64_t u1) {
  decode_dispatch<float, float>(p, sp, out, os, lse, part_acc, part_stat, scratch, u0, u1);
}

__attribute__((target("avx2,fma"))) void backward_avx2(const AttentionParams& p, const float* lse,
                                                       const float* delta, float* dq_part,
                                                       float* scratch, int64_t pair_first,
                                                       int64_t u0, int64_t u1) {
  backward_dispatch<float>(p, lse, delta, dq_part, scratch, pair_first, u0, u1);
}
#endif

// AVX2+FMA when the CPU has it, unless MINIGPT_CPU_ISA=portable asks for the fallback (used to
// test the portable path on AVX2 machines).
bool use_avx2() {
#ifdef MINIGPT_HAVE_AVX2_PATH
  static const bool enabled = [] {
    const char* env = std::getenv("MINIGPT_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "portable") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return enabled;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Host-side drivers: partition, scratch, reductions.

// Merges the chunks' partial rows by their log-sum-exp (see the decode section), in chunk order.
template <typename T, typename LseT>
void decode_merge(const AttentionParams& p, const DecodeSplit& sp, const T* part_acc,
                  const T* part_stat, T* out, const Strides4& os, LseT* lse) {
  const int64_t R = sp.rows, D = p.D, G = p.group_size();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t grain = std::max<int64_t>(1, 16384 / (sp.chunks * D));
  at::parallel_for(0, p.B * p.Hkv * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      const int64_t r = x % R, pair = x / R;
      const int64_t kvh = pair % p.Hkv, b = pair / p.Hkv;
      const int64_t h = kvh * G + r / p.Tq, t = r % p.Tq;
      auto stat = [&](int64_t c, int i) {  // i = 0: m of chunk c, 1: l
        return part_stat[2 * ((pair * sp.chunks + c) * R + r) + i];
      };
      T m = neg_inf;
      for (int64_t c = 0; c < sp.chunks; ++c) m = std::max(m, stat(c, 0));
      T* o = out + b * os.b + h * os.h + t * os.t;
      std::fill(o, o + D, T(0));
      T l = 0;
      if (m != neg_inf) {
        for (int64_t c = 0; c < sp.chunks; ++c) {
          if (stat(c, 0) == neg_inf) continue;  // a chunk of keys this row does not see
          const T w = std::exp(stat(c, 0) - m);
          l += w * stat(c, 1);
          const T* a = part_acc + ((pair * sp.chunks + c) * R + r) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
        }
      }
      const T inv = l > T(0) ? T(1) / l : T(0);
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      lse[(b * p.Hq + h) * p.Tq + t] = static_cast<LseT>(l > T(0) ? m + std::log(l) : neg_inf);
    }
  });
}

template <typename T, typename LseT>
void run_decode(const AttentionParams& p, T* out, const Strides4& os, LseT* lse) {
  const DecodeSplit sp = decode_split(p, at::get_num_threads());
  const int64_t units = p.B * p.Hkv * sp.chunks;
  Scratch<int64_t> cost(units);
  std::fill(cost.data(), cost.data() + units, int64_t(1));  // equal chunks, equal cost
  const std::vector<int64_t> bounds = split_by_cost(cost.data(), units, at::get_num_threads());
  const int64_t parts = sp.chunks > 1 ? units * sp.rows : 0;
  Scratch<T> part_acc(parts * p.D);
  Scratch<T> part_stat(parts * 2);
  const int64_t tile_scratch = decode_tile_scratch(sp, p.D);
  Scratch<T> scratch((static_cast<int64_t>(bounds.size()) - 1) * tile_scratch);
  run_ranges(bounds, [&](int64_t w, int64_t u0, int64_t u1) {
    T* s = scratch.data() + w * tile_scratch;
#ifdef MINIGPT_HAVE_AVX2_PATH
    if constexpr (std::is_same_v<T, float> && std::is_same_v<LseT, float>) {
      if (use_avx2())
        return decode_avx2(p, sp, out, os, lse, part_acc.data(), part_stat.data(), s, u0, u1);
    }
#endif
    decode_portable<T, LseT>(p, sp, out, os, lse, part_acc.data(), part_stat.data(), s, u0, u1);
  });
  if (sp.chunks > 1) decode_merge<T, LseT>(p, sp, part_acc.data(), part_stat.data(), out, os, lse);
}

template <typename T, typename LseT>
void run_forward(const AttentionParams& p, T* out, const Strides4& os, LseT* lse) {
  if (use_decode_path(p)) return run_decode<T, LseT>(p, out, os, lse);
  const int64_t query_tiles = ceil_div(p.Tq, kBlockQ);
  const int64_t key_tiles = ceil_div(p.Tk, kBlockK);
  const int64_t units = p.B * p.Hq * query_tiles;
  Scratch<int64_t> cost(units);
  for (int64_t u = 0; u < units; ++u) {
    const int64_t r0 = (u % query_tiles) * kBlockQ;
    const int64_t tiles =
        p.causal ? ceil_div(visible_key_end(p, r0, std::min(kBlockQ, p.Tq - r0)) -
                                p.first_key(r0), kBlockK)
                 : key_tiles;
    cost.data()[u] = 1 + tiles;  // + 1: the tile's setup and final normalisation
  }
  const std::vector<int64_t> bounds = split_by_cost(cost.data(), units, at::get_num_threads());
  const int64_t tile_scratch = forward_tile_scratch(p.D);
  Scratch<T> scratch((static_cast<int64_t>(bounds.size()) - 1) * tile_scratch);
  run_ranges(bounds, [&](int64_t w, int64_t u0, int64_t u1) {
    T* s = scratch.data() + w * tile_scratch;
#ifdef MINIGPT_HAVE_AVX2_PATH
    if constexpr (std::is_same_v<T, float> && std::is_same_v<LseT, float>) {
      if (use_avx2()) return forward_avx2(p, out, os, lse, s, u0, u1);
    }
#endif
    forward_portable<T, LseT>(p, out, os, lse, s, u0, u1);
  });
}

template <typename T>
void run_backward(const AttentionParams& p) {
  const int64_t D = p.D, G = p.group_size();
  const int64_t rows = p.B * p.Hq * p.Tq;
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);

  // lse as the backward's working type. The float32 lse of the op's contract would cap float64
  // gradients at float32 accuracy, so in float64 the row statistics are recomputed in double.
  std::optional<Scratch<T>> lse_own;
  const T* lse = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    lse = p.lse;
  } else {
    lse_own.emplace(rows);
    Scratch<T> out_scratch(rows * D);
    const Strides4 scratch_stride{p.Hq * p.Tq * D, p.Tq * D, D};
    run_forward<T, T>(p, out_scratch.data(), scratch_stride, lse_own->data());
    lse = lse_own->data();
  }

  // delta_i = rowsum(dO_i * O_i), the softmax-Jacobian term of dS. Alg. 2 computes it before its
  // main loop too: it depends on the row only, not on the key tile.
  Scratch<T> delta(rows);
  at::parallel_for(0, rows, 256, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t row = r_begin; row < r_end; ++row) {
      const int64_t t = row % p.Tq, h = (row / p.Tq) % p.Hq, b = row / (p.Tq * p.Hq);
      const T* o = out + b * p.out_stride.b + h * p.out_stride.h + t * p.out_stride.t;
      const T* g = dout + b * p.dout_stride.b + h * p.dout_stride.h + t * p.dout_stride.t;
      // Summed in double: dP - delta cancels, so delta's rounding error lands in every dS.
      double sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += static_cast<double>(o[d]) * g[d];
      delta.data()[row] = static_cast<T>(sum);
    }
  });

  const int64_t key_tiles = ceil_div(p.Tk, kBlockK);
  const int64_t pairs = p.B * p.Hkv;
  const int64_t units = pairs * key_tiles;
  Scratch<int64_t> cost(units);
  for (int64_t u = 0; u < units; ++u) {
    const int64_t j0 = (u % key_tiles) * kBlockK;
    const int64_t end = query_tile_end(p, j0, std::min(kBlockK, p.Tk - j0));
    cost.data()[u] = 1 + G * std::max<int64_t>(0, end - first_query_tile(p, j0));
  }
  const std::vector<int64_t> bounds = split_by_cost(cost.data(), units, at::get_num_threads());
  const int64_t workers = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t head_size = p.Tq * D;  // elements of one head's dQ

  // Worker w's dQ part covers the (b, kv head) pairs its units touch, pair_first(w) to
  // pair_last(w), G query heads each. All parts share one allocation, as do the tile buffers.
  auto pair_first = [&](int64_t w) { return bounds[w] / key_tiles; };
  auto pair_last = [&](int64_t w) { return (bounds[w + 1] - 1) / key_tiles; };
  std::vector<int64_t> part_offset(workers + 1, 0);
  for (int64_t w = 0; w < workers; ++w) {
    const int64_t size =
        bounds[w] == bounds[w + 1] ? 0 : (pair_last(w) - pair_first(w) + 1) * G * head_size;
    part_offset[w + 1] = part_offset[w] + size;
  }
  Scratch<T> dq_parts(part_offset[workers]);
  const int64_t tile_scratch = backward_tile_scratch(D);
  Scratch<T> scratch(workers * tile_scratch);
  run_ranges(bounds, [&](int64_t w, int64_t u0, int64_t u1) {
    if (u0 == u1) return;
    T* part = dq_parts.data() + part_offset[w];
    std::fill(part, dq_parts.data() + part_offset[w + 1], T(0));
    T* s = scratch.data() + w * tile_scratch;
#ifdef MINIGPT_HAVE_AVX2_PATH
    if constexpr (std::is_same_v<T, float>) {
      if (use_avx2()) return backward_avx2(p, lse, delta.data(), part, s, pair_first(w), u0, u1);
    }
#endif
    backward_portable<T>(p, lse, delta.data(), part, s, pair_first(w), u0, u1);
  });

  // dQ = sum over workers, in worker order, of the parts covering each (b, kv head) pair.
  T* dq = static_cast<T*>(p.dq);
  at::parallel_for(0, pairs * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> parts;
    for (int64_t pg = begin; pg < end; ++pg) {
      const int64_t pair = pg / G, g = pg % G;
      const int64_t h = (pair % p.Hkv) * G + g, b = pair / p.Hkv;
      parts.clear();
      for (int64_t w = 0; w < workers; ++w) {
        if (bounds[w] == bounds[w + 1]) continue;
        if (pair_first(w) <= pair && pair <= pair_last(w))
          parts.push_back(dq_parts.data() + part_offset[w] +
                          ((pair - pair_first(w)) * G + g) * head_size);
      }
      T* dq_h = dq + b * p.dq_stride.b + h * p.dq_stride.h;
      for (int64_t t = 0; t < p.Tq; ++t)
        for (int64_t d = 0; d < D; ++d) {
          T sum = 0;
          for (const T* part : parts) sum += part[t * D + d];
          dq_h[t * p.dq_stride.t + d] = sum;
        }
    }
  });
}

}  // namespace

const char* attention_cpu_isa() { return use_avx2() ? "avx2+fma" : "portable"; }

void attention_forward_cpu(const AttentionParams& p) {
  // No query rows (B, Hq or Tq is 0): out and lse are empty. The work splits below divide by
  // these sizes, so they must never see them.
  if (p.B == 0 || p.Hq == 0 || p.Tq == 0) return;
  if (p.dtype == DType::BFloat16 || p.dtype == DType::Float16) return attention_forward_cpu16(p);
  if (p.dtype == DType::Float32)
    run_forward<float, float>(p, static_cast<float*>(p.out), p.out_stride, p.lse);
  else
    run_forward<double, float>(p, static_cast<double*>(p.out), p.out_stride, p.lse);
}

void attention_backward_cpu(const AttentionParams& p) {
  // An empty batch has empty gradients. (Tq == 0 with keys is not empty: dK and dV are zeros,
  // which the kernels below write.)
  if (p.B == 0 || p.Hq == 0) return;
  if (p.dtype == DType::BFloat16 || p.dtype == DType::Float16) return attention_backward_cpu16(p);
  if (p.dtype == DType::Float32)
    run_backward<float>(p);
  else
    run_backward<double>(p);
}

}  // namespace minigpt
