// minigpt attention, CPU bfloat16/float16: the shared tile helpers (constants, exp, the score
// transform, brgemm tile products, the online softmax over a block of rows, and the final
// normalisation). Included once by attention_cpu_bf16.cpp inside its anonymous namespace, after
// the headers it includes.
#pragma once

namespace cpublas = at::native::cpublas;

// Query rows per head in a forward unit, keys per forward tile, and the backward's square tiles.
// Measured on an AMD EPYC (Zen 4, one thread, bf16, D = 64 and 128): 256-key forward tiles and
// 128 x 128 backward tiles beat 64 and 128 keys by 5-15%; the float32 scores of a forward tile
// (G * 64 x 256) stay in L2.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 256;
constexpr int64_t kBwdBlock = 128;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
constexpr at::ScalarType scalar_type_of() {
  return std::is_same_v<T, at::BFloat16> ? at::kBFloat16 : at::kHalf;
}

// exp for float, written for the auto-vectoriser (no branches, no calls): Cephes expf's range
// reduction and polynomial, as vexp in attention_cpu.cpp. exp(-inf) and anything below -87 give 0.
inline float exp_poly(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds
  const float n = (xc * 1.44269504088896341f + round_magic) - round_magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : y * two_n;
}

#include "cpu/row_reductions.h"

// s[c] = exp(s[c] - m) in place, and pt[c] the same as T (pt may be null); returns their sum.
template <typename T>
MINIGPT_CLONES float exp_row(float* s, float m, int64_t n, T* pt) {
  for (int64_t c = 0; c < n; ++c) s[c] = exp_poly(s[c] - m);
  if (pt != nullptr)
    for (int64_t c = 0; c < n; ++c) pt[c] = static_cast<T>(s[c]);
  return sum_row(s, n);
}

MINIGPT_CLONES void scale_row(float* x, int64_t n, float a) {
  for (int64_t c = 0; c < n; ++c) x[c] *= a;
}

// ds[c] = scale * p[c] * (dp[c] - delta), as T.
template <typename T>
MINIGPT_CLONES void ds_row(const float* p, const float* dp, float delta, float scale, int64_t n,
                           T* ds) {
  for (int64_t c = 0; c < n; ++c) ds[c] = static_cast<T>(scale * p[c] * (dp[c] - delta));
}

// The scores of one row of a tile, in place: scale (and ALiBi), then -inf on keys the row may not
// see. Row position t (in query coordinates), keys j0 .. j0 + n - 1.
void transform_row(const AttentionParams& p, float* s, int64_t n, int64_t t, int64_t j0,
                   float slope, bool alibi) {
  const float scale = p.scale;
  if (alibi) {
    for (int64_t c = 0; c < n; ++c)
      s[c] = s[c] * scale - slope * static_cast<float>(t + p.causal_offset() - j0 - c);
  } else {
    scale_row(s, n, scale);
  }
  if (p.causal) {
    const int64_t last = t + p.causal_offset();  // last visible key
    for (int64_t c = std::max<int64_t>(0, last - j0 + 1); c < n; ++c) s[c] = kNegInf;
    const int64_t first = p.first_key(t);  // window
    for (int64_t c = 0; c < std::min<int64_t>(n, first - j0); ++c) s[c] = kNegInf;
  }
}

// ---------------------------------------------------------------------------------------------
// Tile products: C[M x N] (+)= A[M x K] B[K x N], A and B row-major 16-bit with leading dims lda
// and ldb, C float32 with leading dim ldc.
template <typename T>
void tile_gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
               float* c, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(c + m * ldc, c + m * ldc + N, 0.0f);
    return;
  }
  cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

// ATen's brgemm keeps its tile configuration (AMX, where oneDNN uses it) on the thread until
// released: a worker that ran tile_gemm releases it when it ends, as ATen's own CPU flash
// attention does, so that tile code running later on the thread configures its own.
class BrgemmRelease {
 public:
  explicit BrgemmRelease(bool used) : used_(used) {}
  ~BrgemmRelease() {
    if (used_) cpublas::brgemm_release(/*is_vnni=*/false);
  }
  BrgemmRelease(const BrgemmRelease&) = delete;
  BrgemmRelease& operator=(const BrgemmRelease&) = delete;

 private:
  bool used_;
};

// Transposes rows x cols of src (leading dim lds) into dst (cols x rows, leading dim ldd).
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t kB = 16;  // cache blocking
  for (int64_t r0 = 0; r0 < rows; r0 += kB)
    for (int64_t c0 = 0; c0 < cols; c0 += kB)
      for (int64_t r = r0; r < std::min(rows, r0 + kB); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kB); ++c) dst[c * ldd + r] = src[r * lds + c];
}

// The running statistics of Alg. 1 for a block of query rows: the rows of the G query heads of a
// kv head, stacked, row r being head kvh * G + r / nr at position r0 + r % nr.
struct RowBlock {
  int64_t kvh, G, r0, nr, rows;
  int64_t head(int64_t r) const { return kvh * G + r / nr; }
  int64_t pos(int64_t r) const { return r0 + r % nr; }
};

// One key tile of the online softmax (Alg. 1): the raw scores s (rows x nk, leading dim ld)
// become probabilities exp(s - m) in place (and as T in pt, leading dim ld, where pt is not
// null); m and l are updated and O~ (rows x D) is rescaled by exp(m_old - m_new).
template <typename T>
void online_softmax(const AttentionParams& p, const RowBlock& rb, float* s, int64_t ld,
                    int64_t j0, int64_t nk, float* row_max, float* row_sum, float* acc, T* pt) {
  const bool alibi = p.alibi_slopes != nullptr;
  for (int64_t r = 0; r < rb.rows; ++r) {
    float* sr = s + r * ld;
    transform_row(p, sr, nk, rb.pos(r), j0, alibi ? p.alibi_slopes[rb.head(r)] : 0.0f, alibi);
    const float m_new = max_row(sr, nk, row_max[r]);
    // A row that has seen only masked keys keeps m = -inf; use 0 to keep exp(-inf) = 0.
    const float m_safe = m_new == kNegInf ? 0.0f : m_new;
    const float alpha = exp_poly(row_max[r] - m_safe);
    const float sum = exp_row<T>(sr, m_safe, nk, pt == nullptr ? nullptr : pt + r * ld);
    row_sum[r] = alpha * row_sum[r] + sum;
    row_max[r] = m_new;
    if (alpha != 1.0f) scale_row(acc + r * p.D, p.D, alpha);
  }
}

// o[d] = T(x[d] * a) for d < n.
template <typename T>
void store_scaled(const float* x, int64_t n, float a, T* o) {
  for (int64_t d = 0; d < n; ++d) o[d] = static_cast<T>(x[d] * a);
}

// O = O~ / l as T (each row written by store), and lse = m + log(l) (-inf, with O = 0, for a row
// that saw no key).
template <typename T>
void finish_rows(const AttentionParams& p, const RowBlock& rb, int64_t b, const float* acc,
                 const float* row_max, const float* row_sum,
                 void (*store)(const float*, int64_t, float, T*) = store_scaled<T>) {
  T* out = static_cast<T*>(p.out);
  for (int64_t r = 0; r < rb.rows; ++r) {
    const int64_t h = rb.head(r), t = rb.pos(r);
    const float l = row_sum[r], inv = l > 0.0f ? 1.0f / l : 0.0f;
    store(acc + r * p.D, p.D, inv,
          out + b * p.out_stride.b + h * p.out_stride.h + t * p.out_stride.t);
    p.lse[(b * p.Hq + h) * p.Tq + t] = l > 0.0f ? row_max[r] + std::log(l) : kNegInf;
  }
}
