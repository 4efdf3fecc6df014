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

template <typename T, int Bytes>
struct VecType;
template <int Bytes>
struct VecType<float, Bytes> {
  typedef float type __attribute__((vector_size(Bytes)));
};
template <int Bytes>
struct VecType<double, Bytes> {
  typedef double type __attribute__((vector_size(Bytes)));
};
template <typename T, int Bytes = kVecBytes>
using VecN = typename VecType<T, Bytes>::type;
template <typename T>
using Vec = VecN<T>;
template <typename T, int Bytes = kVecBytes>
constexpr int kLanesN = static_cast<int>(Bytes / sizeof(T));
template <typename T>
constexpr int kLanes = kLanesN<T>;

typedef int32_t Int32VecF __attribute__((vector_size(kVecBytes)));

template <int Bytes = kVecBytes, typename T>
MINIGPT_INLINE VecN<T, Bytes> vload(const T* p) {
  VecN<T, Bytes> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load: tensor rows carry no alignment promise
  return v;
}
template <typename T, typename V>
MINIGPT_INLINE void vstore(T* p, V v) {
  static_assert(sizeof(V) % sizeof(T) == 0, "vector of T expected");
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
  const Int32VecF bits = (__builtin_convertvector(n, Int32VecF) + 127) << 23;
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

// Rows x (NV vectors of VB bytes) block of C held in registers across the whole K loop: per
// step, NV vector loads of B and one broadcast of A per row feed Rows * NV fused multiply-adds.
template <typename T, int Rows, int NV, int VB, ALayout L>
MINIGPT_INLINE void micro_kernel(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
                                 T* c, int64_t ldc, bool accumulate) {
  constexpr int W = kLanesN<T, VB>;
  using V = VecN<T, VB>;
  V acc[Rows][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int n = 0; n < NV; ++n) bv[n] = vload<VB>(b + k * ldb + n * W);
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
      if (accumulate) acc[m][n] += vload<VB>(c + m * ldc + n * W);
      vstore(c + m * ldc + n * W, acc[m][n]);
    }
}

// The last M rows (0 <= M < Rows + 1) of a panel: one micro-kernel with exactly M rows.
template <typename T, int Rows, int NV, int VB, ALayout L>
MINIGPT_INLINE void micro_kernel_rows(int64_t M, int64_t K, const T* a, int64_t lda, const T* b,
                                      int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  if constexpr (Rows > 0) {
    if (M == Rows) return micro_kernel<T, Rows, NV, VB, L>(K, a, lda, b, ldb, c, ldc, accumulate);
    micro_kernel_rows<T, Rows - 1, NV, VB, L>(M, K, a, lda, b, ldb, c, ldc, accumulate);
  }
}

// One column panel of NV vectors over all M rows: full row blocks, then the leftover rows.
template <typename T, int NV, int VB, ALayout L>
void gemm_panel(int64_t M, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock)
    micro_kernel<T, kRowBlock, NV, VB, L>(K, a_elem<L>(a, lda, m, 0), lda, b, ldb, c + m * ldc,
                                          ldc, accumulate);
  micro_kernel_rows<T, kRowBlock - 1, NV, VB, L>(M - m, K, a_elem<L>(a, lda, m, 0), lda, b, ldb,
                                                 c + m * ldc, ldc, accumulate);
}

// C[M x N] (+)= A[M x K] B[K x N]. Not inlined: the tile loops call it with run-time sizes, and
// one copy per (type, A layout) keeps the register-blocked code in one place.
template <typename T, ALayout L>
__attribute__((noinline)) void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda,
                                    const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int W = kLanes<T>;
  int64_t n = 0;
  for (; n + kColVecs * W <= N; n += kColVecs * W)
    gemm_panel<T, kColVecs, kVecBytes, L>(M, K, a, lda, b + n, ldb, c + n, ldc, accumulate);
  for (; n + W <= N; n += W)
    gemm_panel<T, 1, kVecBytes, L>(M, K, a, lda, b + n, ldb, c + n, ldc, accumulate);
  // Columns past the last full vector appear only for head dims that are not a multiple of the
  // lane count (the score tiles are padded to whole vectors). With 64-byte vectors a half-width
  // panel takes the next 8 floats (D = 40: 2 full vectors and a half), then plain scalar code.
  if constexpr (kVecBytes >= 64) {
    constexpr int H = kLanesN<T, kVecBytes / 2>;
    for (; n + H <= N; n += H)
      gemm_panel<T, 1, kVecBytes / 2, L>(M, K, a, lda, b + n, ldb, c + n, ldc, accumulate);
  }
  for (; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      T sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += *a_elem<L>(a, lda, m, k) * b[k * ldb + n];
      c[m * ldc + n] = accumulate ? c[m * ldc + n] + sum : sum;
    }
}

// ---------------------------------------------------------------------------------------------
// Forward (Alg. 1) for units [u0, u1), unit = (b * Hq + h) * query_tiles + i, with this worker's
// forward_tile_scratch(D) elements at scratch. kD > 0 fixes the head dim at compile time so the
// loops over it have constant trip counts; kD == 0 reads p.D.
// The scores are computed transposed, S^T = K_j Q_i^T (keys x queries), so the online
// softmax runs down columns and every query row's max and sum live in one vector lane: no
// horizontal reductions. The scale is applied exactly as the backward applies it when it
// rebuilds P from lse (s * scale - lse), so that both passes round the scores alike. O~ += P V_j then reads P^T through the transposed A layout.
// Copies rows [r0, r1) of D elements, ld apart, from src to dst (row r at dst + r * D), and
// asks for the rows up to `ahead` (exclusive; ahead >= r1) to be fetched into cache a few rows
// before they are copied. Rows a power of two apart in memory defeat the hardware prefetcher,
// which stops at 4 KiB page boundaries: the model's layout puts two rows of a head on a page
// (H * D = 512 floats apart for H = 8, D = 64).
template <typename T>
MINIGPT_INLINE void pack_rows(const T* src, int64_t ld, int64_t r0, int64_t r1, int64_t ahead,
                              int64_t D, T* dst) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  constexpr int64_t kDistance = 8;           // rows
  for (int64_t r = r0; r < r1; ++r) {
    if (r + kDistance < ahead)
      for (int64_t d = 0; d < D; d += kLine) __builtin_prefetch(src + (r + kDistance) * ld + d);
    std::copy(src + r * ld, src + r * ld + D, dst + r * D);
  }
}

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
  // K and V rows in the model's layout, (B, T, H, D) viewed as (B, H, T, D), lie H * D elements
  // apart, a power of two: a tile's rows then share a few L1 sets and evict each other, and the
  // hardware prefetcher does not follow them. With such strides, the kv head's rows are copied
  // side by side (forward_head_scratch) as the units reach them, once per kv head per worker:
  // this worker's units run through the query tiles of a head in order, and each reads the head's
  // keys again, so the copy costs one read of K and V, and every tile product reads contiguous
  // rows.
  const bool pack = packs_kv(p);
  T* k_head = scratch + forward_tile_scratch(D);  // (Tk, D), rows [key_begin, packed_end) valid
  T* v_head = k_head + (pack ? p.Tk * D : 0);     // (Tk, D)
  int64_t packed_pair = -1, packed_end = 0;

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

    // Row by row: each source row is read once, whole. (Column by column, the model's layout
    // would keep 64 rows H * D elements apart in flight, more than L1's ways hold.)
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t d = 0; d < D; ++d) qt[d * kBlockQ + r] = qi[r * p.q_stride.t + d];
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = nr; r < nr_pad; ++r) qt[d * kBlockQ + r] = T(0);
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
    if (pack && b * p.Hkv + h / G != packed_pair) {
      packed_pair = b * p.Hkv + h / G;
      packed_end = key_begin;  // later units of this head start at key_begin or after it
    }
    for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, key_end - j0);
      const T* kj = kh + j0 * p.k_stride.t;
      const T* vj = vh + j0 * p.v_stride.t;
      int64_t ldk = p.k_stride.t, ldv = p.v_stride.t;
      if (pack) {
        if (j0 + nk > packed_end) {
          const int64_t from = std::max(packed_end, j0);
          pack_rows(kh, p.k_stride.t, from, j0 + nk, key_end, D, k_head);
          pack_rows(vh, p.v_stride.t, from, j0 + nk, key_end, D, v_head);
          packed_end = j0 + nk;
        }
        kj = k_head + j0 * D;
        vj = v_head + j0 * D;
        ldk = ldv = D;
      }
      gemm<T, ALayout::RowMajor>(nk, nr_pad, D, kj, ldk, qt, kBlockQ, st, kBlockQ, false);
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
      gemm<T, ALayout::Transposed>(nr, D, nk, st, kBlockQ, vj, ldv, acc, D, true);
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

// sum_lanes(a)[i] = the sum of the lanes of a[i]: W vectors reduced to one in log2(W) rounds of
// pairwise shuffles and adds (the transpose-and-add of a horizontal reduction), instead of W
// separate horizontal sums. In the round with blocks of B lanes, two vectors x, y become one whose
// lane groups of 2B hold x's blocks summed pairwise in the first B lanes and y's in the last B:
// after the last round lane i holds a[i]'s sum. Compilers without __builtin_shufflevector
// (GCC < 12) sum lane by lane.
#ifdef MINIGPT_HAVE_SHUFFLEVECTOR
// Shuffle index of lane `lane` in the round with blocks of `block` lanes, vectors of `lanes`
// lanes; `partner` 0 picks the first addend, `block` the second.
constexpr int sum_lanes_index(int lanes, int block, int lane, int partner) {
  const int base = lane / (2 * block) * 2 * block, g = lane % (2 * block);
  return g < block ? base + g + partner : lanes + base + g - block + partner;
}
template <int Block, typename V, std::size_t... I>
MINIGPT_INLINE V sum_lanes_pair(V x, V y, std::index_sequence<I...>) {
  constexpr int n = sizeof...(I);
  return __builtin_shufflevector(x, y, sum_lanes_index(n, Block, I, 0)...) +
         __builtin_shufflevector(x, y, sum_lanes_index(n, Block, I, Block)...);
}
template <typename T, int Block>
MINIGPT_INLINE void sum_lanes_round(Vec<T>* s) {
  constexpr int W = kLanes<T>;
  for (int i = 0; i < W / Block / 2; ++i)
    s[i] = sum_lanes_pair<Block>(s[2 * i], s[2 * i + 1], std::make_index_sequence<W>{});
  if constexpr (2 * Block < W) sum_lanes_round<T, 2 * Block>(s);
}
#endif

template <typename T>
MINIGPT_INLINE Vec<T> sum_lanes(const Vec<T> (&a)[kLanes<T>]) {
#ifdef MINIGPT_HAVE_SHUFFLEVECTOR
  Vec<T> s[kLanes<T>];
  for (int i = 0; i < kLanes<T>; ++i) s[i] = a[i];
  sum_lanes_round<T, 1>(s);
  return s[0];
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
  T* k_pack = dv_acc + kBlockK * D;    // (kBlockK, D): K_j, rows side by side
  // Q and dO with rows not side by side (the model's layout; see forward_units) are copied,
  // G query heads of a (batch, kv head) pair at once, when this worker's units reach the pair:
  // every key tile of the pair reads them again.
  const bool pack_k = p.k_stride.t != D, pack = packs_q_dout(p);
  T* q_group = scratch + backward_tile_scratch(D);      // (G, Tq, D)
  T* do_group = q_group + (pack ? G * p.Tq * D : 0);   // (G, Tq, D)
  int64_t packed_pair = -1;

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

    for (int64_t c = 0; c < nk; ++c)  // row by row, as in forward_units
      for (int64_t d = 0; d < D; ++d) {
        kt[d * kBlockK + c] = kj[c * p.k_stride.t + d];
        vt[d * kBlockK + c] = vj[c * p.v_stride.t + d];
      }
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = nk; c < nk_pad; ++c) kt[d * kBlockK + c] = vt[d * kBlockK + c] = T(0);
    const T* kr = kj;  // K_j row-major, rows ldk apart
    int64_t ldk = p.k_stride.t;
    if (pack_k) {
      pack_rows(kj, ldk, 0, nk, nk, D, k_pack);
      kr = k_pack;
      ldk = D;
    }
    if (pack && pair != packed_pair) {
      packed_pair = pair;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        pack_rows(q + b * p.q_stride.b + h * p.q_stride.h, p.q_stride.t, 0, p.Tq, p.Tq, D,
                  q_group + g * p.Tq * D);
        pack_rows(dout + b * p.dout_stride.b + h * p.dout_stride.h, p.dout_stride.t, 0, p.Tq,
                  p.Tq, D, do_group + g * p.Tq * D);
      }
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
      const int64_t tile_end = query_tile_end(p, j0, nk, kBlockQ);
      for (int64_t i = first_query_tile(p, j0, kBlockQ); i < tile_end; ++i) {
        const int64_t r0 = i * kBlockQ;
        const int64_t nr = std::min(kBlockQ, p.Tq - r0);
        const T* qi = q + b * p.q_stride.b + h * p.q_stride.h + r0 * p.q_stride.t;
        const T* doi = dout + b * p.dout_stride.b + h * p.dout_stride.h + r0 * p.dout_stride.t;
        int64_t ldq = p.q_stride.t, lddo = p.dout_stride.t;
        if (pack) {
          qi = q_group + (g * p.Tq + r0) * D;
          doi = do_group + (g * p.Tq + r0) * D;
          ldq = lddo = D;
        }

        gemm<T, ALayout::RowMajor>(nr, nk_pad, D, qi, ldq, kt, kBlockK, pt, kBlockK,
                                   false);
        gemm<T, ALayout::RowMajor>(nr, nk_pad, D, doi, lddo, vt, kBlockK, ds, kBlockK,
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
        gemm<T, ALayout::Transposed>(nk, D, nr, pt, kBlockK, doi, lddo, dv_acc, D,
                                     true);
        gemm<T, ALayout::Transposed>(nk, D, nr, ds, kBlockK, qi, ldq, dk_acc, D, true);
        gemm<T, ALayout::RowMajor>(nr, D, nk, ds, kBlockK, kr, ldk, dq_h + r0 * D, D,
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
