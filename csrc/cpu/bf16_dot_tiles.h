// minigpt attention, CPU bfloat16: tile products on AVX512-BF16 dot products (vdpbf16ps), for
// CPUs that have them (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later).
// Included once by attention_cpu_bf16.cpp inside its anonymous namespace, after <immintrin.h>.
//
// vdpbf16ps multiplies 16 pairs of bf16 by 16 pairs and adds each pair's two products to a
// float32 lane: c[n] += a[2i] b[2i][n] + a[2i+1] b[2i+1][n]. So C (M x N, float32) += A B, with
// K the summed dimension, takes
//   A: row-major bf16 with K even, read as 32-bit words: word (m, kp) = (A[m][2kp], A[m][2kp+1]),
//      broadcast to the 16 lanes;
//   B: packed in pairs of rows ("VNNI" layout): word (kp, n) = (B[2kp][n], B[2kp+1][n]), 16
//      consecutive columns per vector.
// Two packings give B from the row-major (n x D) blocks attention holds (q, k, v, dout):
//   pack_t32: B = X^T (D x n), for S = Q K^T and dP = dO V^T; word (dp, c) = (X[c][2dp],
//     X[c][2dp+1]): the transpose of X read as (n x D/2) 32-bit words.
//   pack_pairs: B = X (n x D), for O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K; word
//     (cp, d) = (X[2cp][d], X[2cp+1][d]): rows 2cp and 2cp+1 interleaved (a missing last row
//     is 0).
// An odd K is padded with a zero column in A (its pair's B word may hold anything finite).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MINIGPT_HAVE_DPBF16 1

// Whether this CPU (and its operating system) runs vdpbf16ps on zmm registers.
bool cpu_has_dpbf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// GCC's intrinsics start some vectors from _mm512_undefined_*() (or _mm256_undefined_*()), which
// it then reports as (possibly) uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
namespace dpbf16 {

// Register block: MR rows x NV vectors of 16 columns of C in zmm registers (6 x 4 = 24 of the
// 32, the rest NV vectors of B and one broadcast of A), as the float32 AVX-512 path. TAIL: the
// last vector holds fewer than 16 columns (mask `last`).
template <int MR, int NV, bool TAIL>
inline void block(int64_t kp0, int64_t Kp, const uint32_t* a, int64_t lda, const uint32_t* b,
                  int64_t ldb, float* c, int64_t ldc, bool accumulate, __mmask16 last) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      if (!accumulate)
        acc[m][v] = _mm512_setzero_ps();
      else if (TAIL && v == NV - 1)
        acc[m][v] = _mm512_maskz_loadu_ps(last, c + m * ldc + 16 * v);
      else
        acc[m][v] = _mm512_loadu_ps(c + m * ldc + 16 * v);
    }
  for (int64_t kp = kp0; kp < Kp; ++kp) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v)
      bv[v] = (TAIL && v == NV - 1)
                  ? (__m512bh)_mm512_maskz_loadu_epi32(last, b + kp * ldb + 16 * v)
                  : (__m512bh)_mm512_loadu_si512(b + kp * ldb + 16 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[m * lda + kp]));
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], av, bv[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      if (TAIL && v == NV - 1)
        _mm512_mask_storeu_ps(c + m * ldc + 16 * v, last, acc[m][v]);
      else
        _mm512_storeu_ps(c + m * ldc + 16 * v, acc[m][v]);
    }
}

// One panel of up to 16 * NV columns, all M rows, in blocks of 6 rows.
template <int NV, bool TAIL>
void panel(int64_t M, int64_t Kp, const uint32_t* a, int64_t lda, const uint32_t* b,
           int64_t ldb, float* c, int64_t ldc, bool accumulate, __mmask16 last) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6)
    block<6, NV, TAIL>(0, Kp, a + m * lda, lda, b, ldb, c + m * ldc, ldc, accumulate, last);
  const uint32_t* ar = a + m * lda;
  float* cr = c + m * ldc;
  switch (M - m) {
    case 5: block<5, NV, TAIL>(0, Kp, ar, lda, b, ldb, cr, ldc, accumulate, last); break;
    case 4: block<4, NV, TAIL>(0, Kp, ar, lda, b, ldb, cr, ldc, accumulate, last); break;
    case 3: block<3, NV, TAIL>(0, Kp, ar, lda, b, ldb, cr, ldc, accumulate, last); break;
    case 2: block<2, NV, TAIL>(0, Kp, ar, lda, b, ldb, cr, ldc, accumulate, last); break;
    case 1: block<1, NV, TAIL>(0, Kp, ar, lda, b, ldb, cr, ldc, accumulate, last); break;
    default: break;
  }
}

template <bool TAIL>
void panel_any(int64_t nv, int64_t M, int64_t Kp, const uint32_t* a, int64_t lda,
               const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
               __mmask16 last) {
  switch (nv) {
    case 4: panel<4, TAIL>(M, Kp, a, lda, b, ldb, c, ldc, accumulate, last); break;
    case 3: panel<3, TAIL>(M, Kp, a, lda, b, ldb, c, ldc, accumulate, last); break;
    case 2: panel<2, TAIL>(M, Kp, a, lda, b, ldb, c, ldc, accumulate, last); break;
    default: panel<1, TAIL>(M, Kp, a, lda, b, ldb, c, ldc, accumulate, last); break;
  }
}

// C[M x N] (+)= A B over Kp pairs of K: a (M x Kp words, leading dim lda words), b packed (Kp x
// N words, leading dim ldb words), c float32 (leading dim ldc). Kp = 0 leaves or zeroes C.
// Panels of 64 columns outermost; gemm (below) with row limits calls it when there are none.
void gemm_panels(int64_t M, int64_t N, int64_t Kp, const uint32_t* a, int64_t lda, const uint32_t* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nn = std::min<int64_t>(64, N - n0), nv = (nn + 15) / 16, rem = nn % 16;
    if (rem == 0)
      panel_any<false>(nv, M, Kp, a, lda, b + n0, ldb, c + n0, ldc, accumulate, 0xFFFF);
    else
      panel_any<true>(nv, M, Kp, a, lda, b + n0, ldb, c + n0, ldc, accumulate,
                      static_cast<__mmask16>((1u << rem) - 1));
  }
}

// Per-row limits of a tile product under a causal mask, where the caller knows that row m of
// C is read only in columns [0, n_end[m]) and that A's words of row m outside pairs
// [kp_begin[m], kp_end[m]) are zero (masked P or dS): a block of rows computes the union of its
// rows' ranges (columns rounded up to 16) and skips the rest, which on the diagonal tiles of
// causal attention is most of a triangle. A null array means no limit.
struct RowLimits {
  const int32_t* n_end = nullptr;
  const int32_t* kp_begin = nullptr;
  const int32_t* kp_end = nullptr;
};

template <int MR>
void block_nv(int64_t nv, bool tail, int64_t kp0, int64_t kp1, const uint32_t* a, int64_t lda,
              const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
              __mmask16 last) {
  switch (nv * 2 + (tail ? 1 : 0)) {
    case 8: block<MR, 4, false>(kp0, kp1, a, lda, b, ldb, c, ldc, accumulate, last); break;
    case 9: block<MR, 4, true>(kp0, kp1, a, lda, b, ldb, c, ldc, accumulate, last); break;
    case 6: block<MR, 3, false>(kp0, kp1, a, lda, b, ldb, c, ldc, accumulate, last); break;
    case 7: block<MR, 3, true>(kp0, kp1, a, lda, b, ldb, c, ldc, accumulate, last); break;
    case 4: block<MR, 2, false>(kp0, kp1, a, lda, b, ldb, c, ldc, accumulate, last); break;
    case 5: block<MR, 2, true>(kp0, kp1, a, lda, b, ldb, c, ldc, accumulate, last); break;
    case 2: block<MR, 1, false>(kp0, kp1, a, lda, b, ldb, c, ldc, accumulate, last); break;
    default: block<MR, 1, true>(kp0, kp1, a, lda, b, ldb, c, ldc, accumulate, last); break;
  }
}

// gemm_panels (above) with per-row limits: row blocks of 6 outermost, each over the columns and
// pairs its rows need.
void gemm(int64_t M, int64_t N, int64_t Kp, const uint32_t* a, int64_t lda, const uint32_t* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate, const RowLimits& lim = {}) {
  if (lim.n_end == nullptr && lim.kp_begin == nullptr && lim.kp_end == nullptr)
    return gemm_panels(M, N, Kp, a, lda, b, ldb, c, ldc, accumulate);
  for (int64_t m = 0; m < M; m += 6) {
    const int64_t mr = std::min<int64_t>(6, M - m);
    int64_t n_hi = lim.n_end ? 0 : N, k0 = lim.kp_begin ? Kp : 0, k1 = lim.kp_end ? 0 : Kp;
    for (int64_t r = m; r < m + mr; ++r) {
      if (lim.n_end) n_hi = std::max<int64_t>(n_hi, lim.n_end[r]);
      if (lim.kp_begin) k0 = std::min<int64_t>(k0, lim.kp_begin[r]);
      if (lim.kp_end) k1 = std::max<int64_t>(k1, lim.kp_end[r]);
    }
    n_hi = std::min(N, (n_hi + 15) / 16 * 16);
    k0 = std::clamp<int64_t>(k0, 0, Kp);
    k1 = std::clamp<int64_t>(k1, k0, Kp);
    const uint32_t* am = a + m * lda;
    float* cm = c + m * ldc;
    for (int64_t n0 = 0; n0 < n_hi; n0 += 64) {
      const int64_t nn = std::min<int64_t>(64, n_hi - n0), nv = (nn + 15) / 16, rem = nn % 16;
      const __mmask16 last = rem ? static_cast<__mmask16>((1u << rem) - 1) : 0xFFFF;
      const uint32_t* bn = b + n0;
      float* cn = cm + n0;
      switch (mr) {
        case 6: block_nv<6>(nv, rem, k0, k1, am, lda, bn, ldb, cn, ldc, accumulate, last); break;
        case 5: block_nv<5>(nv, rem, k0, k1, am, lda, bn, ldb, cn, ldc, accumulate, last); break;
        case 4: block_nv<4>(nv, rem, k0, k1, am, lda, bn, ldb, cn, ldc, accumulate, last); break;
        case 3: block_nv<3>(nv, rem, k0, k1, am, lda, bn, ldb, cn, ldc, accumulate, last); break;
        case 2: block_nv<2>(nv, rem, k0, k1, am, lda, bn, ldb, cn, ldc, accumulate, last); break;
        default: block_nv<1>(nv, rem, k0, k1, am, lda, bn, ldb, cn, ldc, accumulate, last); break;
      }
    }
  }
}

// dst word (cp, d), leading dim D, = (x[2cp][d], x[2cp+1][d]) for cp < ceil(n/2), d < D; a
// missing row 2cp+1 = n reads as 0. x (n x D) bf16 with row stride ldx.
void pack_pairs(int64_t n, int64_t D, const uint16_t* x, int64_t ldx, uint32_t* dst) {
  for (int64_t c = 0; c < n; c += 2) {
    const uint16_t* lo = x + c * ldx;
    const uint16_t* hi = c + 1 < n ? lo + ldx : nullptr;
    uint32_t* o = dst + (c / 2) * D;
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(lo + d)));
      const __m512i h = hi ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(hi + d)))
                           : _mm512_setzero_si512();
      _mm512_storeu_si512(o + d, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
    }
    for (; d < D; ++d) o[d] = uint32_t(lo[d]) | (hi ? uint32_t(hi[d]) << 16 : 0u);
  }
}

// Transposes 16 x 16 32-bit words in place: r[i] lane l becomes r[l] lane i.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // c[j][g]: in its 128-bit lane L, column 4L + j of rows 4g .. 4g + 3.
  __m512i c[4][4];
  for (int g = 0; g < 4; ++g) {
    c[0][g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    c[1][g] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    c[2][g] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    c[3][g] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i u0 = _mm512_shuffle_i32x4(c[j][0], c[j][1], 0x44);  // lanes 0, 1 of each
    const __m512i u1 = _mm512_shuffle_i32x4(c[j][0], c[j][1], 0xEE);  // lanes 2, 3
    const __m512i u2 = _mm512_shuffle_i32x4(c[j][2], c[j][3], 0x44);
    const __m512i u3 = _mm512_shuffle_i32x4(c[j][2], c[j][3], 0xEE);
    r[j] = _mm512_shuffle_i32x4(u0, u2, 0x88);       // lane 0 of the four row groups
    r[4 + j] = _mm512_shuffle_i32x4(u0, u2, 0xDD);   // lane 1
    r[8 + j] = _mm512_shuffle_i32x4(u1, u3, 0x88);   // lane 2
    r[12 + j] = _mm512_shuffle_i32x4(u1, u3, 0xDD);  // lane 3
  }
}

// dst word (dp, c), leading dim ldd, = (x[c][2dp], x[c][2dp+1]) for c < n, dp < D/2: x (n x D)
// bf16 with row stride ldx (even), D even: the transpose of x read as (n x D/2) 32-bit words, in
// 16 x 16 word blocks (transpose16) where whole blocks fit, word by word at the edges.
void pack_t32(int64_t n, int64_t D, const uint16_t* x, int64_t ldx, uint32_t* dst, int64_t ldd) {
  const int64_t Dp = D / 2, ldw = ldx / 2, full_c = n / 16 * 16, full_dp = Dp / 16 * 16;
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(x);
  for (int64_t c0 = 0; c0 < full_c; c0 += 16)
    for (int64_t d0 = 0; d0 < full_dp; d0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(xw + (c0 + i) * ldw + d0);
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (d0 + j) * ldd + c0, r[j]);
    }
  for (int64_t dp = 0; dp < Dp; ++dp)  // the edges
    for (int64_t c = dp < full_dp ? full_c : 0; c < n; ++c) dst[dp * ldd + c] = xw[c * ldw + dp];
}

// dst word (c, rp), leading dim ldd, = (x[2rp][c], x[2rp+1][c]) for c < cols, rp <
// ceil(rows/2); a missing row 2rp+1 = rows reads as 0. x (rows x cols) bf16 with row stride
// ldx. The A operand X^T of dV += P^T dO and dK += dS^T Q, in 16 x 16 word blocks.
void pack_pairs_transposed(int64_t rows, int64_t cols, const uint16_t* x, int64_t ldx,
                           uint32_t* dst, int64_t ldd) {
  auto word = [&](int64_t rp, int64_t c) {
    const uint32_t lo = x[2 * rp * ldx + c];
    return 2 * rp + 1 < rows ? lo | uint32_t(x[(2 * rp + 1) * ldx + c]) << 16 : lo;
  };
  const int64_t full_rp = rows / 32 * 16, full_c = cols / 16 * 16, n_rp = (rows + 1) / 2;
  for (int64_t rp0 = 0; rp0 < full_rp; rp0 += 16)
    for (int64_t c0 = 0; c0 < full_c; c0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const uint16_t* lo = x + 2 * (rp0 + i) * ldx + c0;
        const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)lo));
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(lo + ldx)));
        r[i] = _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
      }
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (c0 + i) * ldd + rp0, r[i]);
    }
  for (int64_t c = 0; c < cols; ++c)  // the edges
    for (int64_t rp = c < full_c ? full_rp : 0; rp < n_rp; ++rp) dst[c * ldd + rp] = word(rp, c);
}


// 2^t of 16 floats: t = n + f with n = round(t) and f in [-1/2, 1/2], 2^f by Cephes exp2f's
// polynomial (about 1 ulp), times 2^n by vscalefps. The softmax below folds the scale and log2(e)
// into one FMA, t = s (scale log2 e) - m log2 e, as FlashAttention does with exp2 (Dao 2023,
// sec. 3.1). t is clamped below at -126, so that no result is subnormal (slow on some CPUs):
// under 2^-126, about 1.2e-38, where exp_poly gives 0 (below e^-87 = 2^-125.5), this gives
// 2^-126; NaN stays NaN; above 128, inf.
inline __m512 exp2_16(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-126.0f), t);  // NaN in t passes through
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_set1_ps(1.535336188319500e-4f);
  for (float coef : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f,
                     2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f})
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(coef));
  return _mm512_scalef_ps(y, n);
}

constexpr float kLog2e = 1.44269504088896341f;

// The first min(n, 16) of 16 lanes (n >= 0).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// x (n floats) times a, rounded to bf16 (round to nearest even) into out: vectorised
// static_cast<at::BFloat16>, except that float32 values below the normal range give 0.
inline void store_bf16(const float* x, int64_t n, float a, uint16_t* out) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = first_lanes(n - c);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + c), av));
    _mm256_mask_storeu_epi16(out + c, m, (__m256i)h);
  }
}

// 8 bf16 (the lanes of m) as 8 doubles.
inline __m512d widen_bf16x8(const uint16_t* z, __mmask8 m) {
  const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(m, z)), 16);
  return _mm512_cvtps_pd(_mm256_castsi256_ps(w));
}

// sum_d x[d] y[d] of two bf16 rows of n, the products and their sum in double, in 8 lanes:
// the backward's delta = rowsum(dO * O) (dP - delta cancels).
inline float dot_bf16_double(const uint16_t* x, const uint16_t* y, int64_t n) {
  __m512d acc = _mm512_setzero_pd();
  for (int64_t d = 0; d < n; d += 8) {
    const __mmask8 m = n - d >= 8 ? 0xFF : static_cast<__mmask8>((1u << (n - d)) - 1);
    acc = _mm512_fmadd_pd(widen_bf16x8(x + d, m), widen_bf16x8(y + d, m), acc);
  }
  return static_cast<float>(_mm512_reduce_add_pd(acc));
}

// Keys [lo, hi) of a tile (keys j0 .. j0 + nk - 1) that query row t may see, as transform_row
// (cpu16_tiles.h) masks them: causal, and the window's first key.
inline void visible_keys(const AttentionParams& p, int64_t t, int64_t j0, int64_t nk, int64_t* lo,
                         int64_t* hi) {
  *lo = 0;
  *hi = nk;
  if (p.causal) {
    *hi = causal_key_end(p, t, j0, nk);
    *lo = std::clamp<int64_t>(p.first_key(t) - j0, 0, *hi);
  }
}

// Lanes i of the 16 keys c .. c + 15 with lo <= c + i < hi.
inline __mmask16 key_mask(int64_t c, int64_t lo, int64_t hi) {
  const uint32_t a = static_cast<uint32_t>(std::clamp<int64_t>(lo - c, 0, 16));
  const uint32_t b = static_cast<uint32_t>(std::clamp<int64_t>(hi - c, 0, 16));
  return static_cast<__mmask16>(((1u << b) - 1) & ~((1u << a) - 1));
}

// The 16-key vectors of a row that sees keys [lo, hi) of a tile of nk: those from `first` to
// `end` (exclusive; both multiples of 16) hold its visible keys, every lane visible except in the
// first and the last (key_mask); the row's other vectors, up to `all` (nk rounded up to 16), are
// all masked. A row that sees no key has first = end = 0.
struct RowVectors {
  int64_t first, end, all;
  RowVectors(int64_t lo, int64_t hi, int64_t nk)
      : first(lo < hi ? lo / 16 * 16 : 0), end(lo < hi ? (hi + 15) / 16 * 16 : 0),
        all((nk + 15) / 16 * 16) {}
  static __mmask16 lanes(int64_t c, int64_t lo, int64_t hi) {
    return c >= lo && c + 16 <= hi ? static_cast<__mmask16>(0xFFFF) : key_mask(c, lo, hi);
  }
};

// Zeros as bf16 in the lanes [c0, c1) of a row (multiples of 16).
inline void zero_bf16(uint16_t* row, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + c), _mm256_setzero_si256());
}

// online_softmax (cpu16_tiles.h) for the forward's rows without ALiBi, in two passes over each
// row of raw scores s (rows x nk float32, leading dim ld) instead of five: the max of the
// visible scores (times scale once: the max of the scaled scores, as scale > 0), then P =
// exp(scale s - m) = 2^(s scale log2 e - m log2 e) written as bf16 to pt (leading dim ld; lanes
// past nk up to the next 16 are written as 0), its float32 sum, and O~ (rows x D) rescaled. The
// keys a row may not see (causal, window) stay out of the max and get P = 0; both passes read
// only the vectors that hold visible keys. s is left as it was.
void softmax_rows(const AttentionParams& p, const RowBlock& rb, const float* s, int64_t ld,
                  int64_t j0, int64_t nk, float* row_max, float* row_sum, float* acc,
                  uint16_t* pt) {
  const __m512 scale2 = _mm512_set1_ps(p.scale * kLog2e);
  for (int64_t r = 0; r < rb.rows; ++r) {
    int64_t lo, hi;
    visible_keys(p, rb.pos(r), j0, nk, &lo, &hi);
    const RowVectors vec(lo, hi, nk);
    const float* sr = s + r * ld;
    __m512 mv = _mm512_set1_ps(kNegInf);
    for (int64_t c = vec.first; c < vec.end; c += 16) {
      const __mmask16 m = RowVectors::lanes(c, lo, hi);
      mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, sr + c));
    }
    const float m_new = std::max(row_max[r], _mm512_reduce_max_ps(mv) * p.scale);
    // A row that has seen only masked keys keeps m = -inf; use 0 to keep exp(-inf) = 0.
    const float m_safe = m_new == kNegInf ? 0.0f : m_new;
    const float alpha = exp_poly(row_max[r] - m_safe);
    const __m512 mb = _mm512_set1_ps(m_safe * kLog2e);
    __m512 sum = _mm512_setzero_ps();
    uint16_t* pr = pt + r * ld;
    zero_bf16(pr, 0, vec.first);
    for (int64_t c = vec.first; c < vec.end; c += 16) {
      const __mmask16 m = RowVectors::lanes(c, lo, hi);
      const __m512 t = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, sr + c), scale2, mb);
      const __m512 e = _mm512_maskz_mov_ps(m, exp2_16(t));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + c), (__m256i)_mm512_cvtneps_pbh(e));
    }
    zero_bf16(pr, vec.end, vec.all);
    row_sum[r] = alpha * row_sum[r] + _mm512_reduce_add_ps(sum);
    row_max[r] = m_new;
    if (alpha != 1.0f) {
      const __m512 av = _mm512_set1_ps(alpha);
      float* ar = acc + r * p.D;
      for (int64_t d = 0; d < p.D; d += 16) {
        const __mmask16 m = first_lanes(p.D - d);
        _mm512_mask_storeu_ps(ar + d, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, ar + d), av));
      }
    }
  }
}

// The backward's rows without ALiBi (transform_row, exp_row and ds_row of cpu16_tiles.h in one
// pass over each row): P = exp(scale s - lse) and dS = scale P (dP - delta), written as bf16 to
// pt and dst (leading dim ld; lanes past nk up to the next 16 are written as 0); the keys a row
// may not see get 0, and only the vectors that hold visible keys are read. s and dp: the raw
// scores and dO V^T of rows r0 .. r0 + nq - 1 (nq x nk float32, leading dim ld), left as they
// were; lse and delta: those rows' values.
void backward_rows(const AttentionParams& p, const float* s, const float* dp, int64_t ld,
                   int64_t nq, int64_t r0, int64_t j0, int64_t nk, const float* lse,
                   const float* delta, uint16_t* pt, uint16_t* dst) {
  const __m512 scale = _mm512_set1_ps(p.scale), scale2 = _mm512_set1_ps(p.scale * kLog2e);
  for (int64_t r = 0; r < nq; ++r) {
    int64_t lo, hi;
    visible_keys(p, r0 + r, j0, nk, &lo, &hi);
    const RowVectors vec(lo, hi, nk);
    // A row with no visible key (lse = -inf) has P = 0: subtract +inf.
    const __m512 m = _mm512_set1_ps(lse[r] == kNegInf ? std::numeric_limits<float>::infinity()
                                                      : lse[r] * kLog2e);
    const __m512 dl = _mm512_set1_ps(delta[r]);
    uint16_t* pr = pt + r * ld;
    uint16_t* dr = dst + r * ld;
    zero_bf16(pr, 0, vec.first);
    zero_bf16(dr, 0, vec.first);
    for (int64_t c = vec.first; c < vec.end; c += 16) {
      const __mmask16 k = RowVectors::lanes(c, lo, hi);
      const __m512 t = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + r * ld + c), scale2, m);
      const __m512 pv = _mm512_maskz_mov_ps(k, exp2_16(t));  // 2^(s scale log2 e - lse log2 e)
      const __m512 ds = _mm512_mul_ps(
          _mm512_mul_ps(scale, pv), _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + r * ld + c), dl));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + c), (__m256i)_mm512_cvtneps_pbh(pv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dr + c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps(k, ds)));
    }
    zero_bf16(pr, vec.end, vec.all);
    zero_bf16(dr, vec.end, vec.all);
  }
}

}  // namespace dpbf16
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#else
// Elsewhere the path is never chosen (cpu_has_dpbf16() is false); these keep its call sites
// free of #ifdefs.
bool cpu_has_dpbf16() { return false; }
namespace dpbf16 {
struct RowLimits {
  const int32_t* n_end = nullptr;
  const int32_t* kp_begin = nullptr;
  const int32_t* kp_end = nullptr;
};
inline void gemm(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint32_t*, int64_t,
                 float*, int64_t, bool, const RowLimits& = {}) {
  TORCH_CHECK(false, "minigpt: AVX512-BF16 tiles are not built for this CPU");
}
inline void pack_t32(int64_t, int64_t, const uint16_t*, int64_t, uint32_t*, int64_t) {
  TORCH_CHECK(false, "minigpt: AVX512-BF16 tiles are not built for this CPU");
}
inline void pack_pairs(int64_t, int64_t, const uint16_t*, int64_t, uint32_t*) {
  TORCH_CHECK(false, "minigpt: AVX512-BF16 tiles are not built for this CPU");
}
inline void softmax_rows(const AttentionParams&, const RowBlock&, const float*, int64_t, int64_t,
                         int64_t, float*, float*, float*, uint16_t*) {
  TORCH_CHECK(false, "minigpt: AVX512-BF16 tiles are not built for this CPU");
}
inline void backward_rows(const AttentionParams&, const float*, const float*, int64_t, int64_t,
                          int64_t, int64_t, int64_t, const float*, const float*, uint16_t*,
                          uint16_t*) {
  TORCH_CHECK(false, "minigpt: AVX512-BF16 tiles are not built for this CPU");
}
inline void pack_pairs_transposed(int64_t, int64_t, const uint16_t*, int64_t, uint32_t*, int64_t) {
  TORCH_CHECK(false, "minigpt: AVX512-BF16 tiles are not built for this CPU");
}
inline void store_bf16(const float*, int64_t, float, uint16_t*) {
  TORCH_CHECK(false, "minigpt: AVX512-BF16 tiles are not built for this CPU");
}
inline float dot_bf16_double(const uint16_t*, const uint16_t*, int64_t) {
  TORCH_CHECK(false, "minigpt: AVX512-BF16 tiles are not built for this CPU");
  return 0.0f;
}
}  // namespace dpbf16
#endif
