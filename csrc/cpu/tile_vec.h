// minigpt attention, CPU tile code: vectors of any width, exp, and the tile products C (+)= A B.
// Included by attention_tiles.h, inside one namespace per instruction set (see there).

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

