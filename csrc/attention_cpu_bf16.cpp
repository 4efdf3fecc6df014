// minigpt attention: CPU forward and backward for bfloat16 and float16.
//
// Same algorithm as the float32 kernels (csrc/attention_cpu.cpp: FlashAttention-2, Dao 2023,
// Alg. 1 and 2). The tile products run, for bfloat16, on our own AMX tiles on a CPU with AMX-BF16
// (Intel Sapphire Rapids and later; cpu/amx_tiles.h), else on our own vdpbf16ps register blocks
// on a CPU with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and later;
// cpu/bf16_dot_tiles.h): both read K, V, Q and dO packed once per call into 32-bit pairs, P^T and
// dS^T paired per tile. Elsewhere, and for float16, they run on ATen's CPU batch-reduce GEMM,
// at::native::cpublas::brgemm (16-bit inputs, float32 accumulation, plain row-major operands read
// in place: oneDNN's 16-bit matmul underneath). Measured with 2 threads, causal, the model's
// layout: on an AMD EPYC (Zen 4, T 1024-4096) the vdpbf16ps blocks take 0.45-0.7x SDPA's bf16
// time where brgemm took 0.72-1.30x, whose per-call cost dominated at 64-256-row tiles; on an
// Intel Xeon with AMX (T 512-4096) the AMX tiles take 0.32-0.52x SDPA's forward+backward time
// and 0.16-0.33x the vdpbf16ps blocks' (docs/kernels.md).
//
// Precision: scores, the online softmax (m, l), lse, delta and every accumulator (O~, dK, dV,
// dQ) are float32. P and dS are rounded to the input dtype before their products, as
// FlashAttention-2 does on GPUs; the error stays within the project's rule (at most 2x the naive
// computation's error in the same dtype, both against float64).
//
// Work split (as in the float32 kernels, so GQA reads K and V once per kv head):
//   forward: one unit per (batch, kv head, query tile); its rows are the tile's query rows of all
//     G query heads of the group, stacked (row r is head g = r / nr, position r0 + r % nr).
//   backward: one unit per (batch, kv head, key tile), owning its rows of dK and dV; dQ is summed
//     in per-worker float32 buffers, reduced in worker order at the end (deterministic).
#include "attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_cpu_common.h"

namespace minigpt {
namespace {

// Under a causal mask, the end (exclusive, relative to j0, in [0, nk]) of the keys j0 ..
// j0 + nk - 1 that query row t sees, and the first of the queries r0 .. r0 + nq - 1 (relative
// to r0, in [0, nq]) that see key j: the limits of the dot-product path's tile products
// (dpbf16::RowLimits).
inline int32_t causal_key_end(const AttentionParams& p, int64_t t, int64_t j0, int64_t nk) {
  return static_cast<int32_t>(std::clamp<int64_t>(t + p.causal_offset() - j0 + 1, 0, nk));
}
inline int32_t causal_first_query(const AttentionParams& p, int64_t j, int64_t r0, int64_t nq) {
  return static_cast<int32_t>(std::clamp<int64_t>(j - p.causal_offset() - r0, 0, nq));
}

#include "cpu/cpu16_tiles.h"
#include "cpu/bf16_dot_tiles.h"
#include "cpu/amx_tiles.h"

// What computes the bf16 tile products in this process: AMX tiles (cpu/amx_tiles.h) where the
// CPU has AMX-BF16 and AVX512-BF16 and the CPU kernels' vector path is avx512, else our
// vdpbf16ps register blocks (cpu/bf16_dot_tiles.h) where it has AVX512-BF16, else ATen's brgemm
// (also for float16, and under MINIGPT_CPU_ISA=avx2 or portable).
// MINIGPT_CPU_BF16_PRODUCTS=amx|avx512_bf16|brgemm asks for one (ATen's brgemm is oneDNN's,
// which uses AMX where the CPU has it); one this CPU lacks falls back to the best it has, with a
// warning. Read once per process.
enum class Products { kBrgemm, kDpbf16, kAmx };  // in the order of preference

// The name MINIGPT_CPU_BF16_PRODUCTS and build_info()["bf16_products"] use.
const char* products_name(Products products) {
  switch (products) {
    case Products::kAmx: return "amx";
    case Products::kDpbf16: return "avx512_bf16";
    default: return "brgemm";
  }
}

Products select_products() {
  const char* env = std::getenv("MINIGPT_CPU_BF16_PRODUCTS");
  const bool dp = cpu_has_dpbf16() && std::strcmp(attention_cpu_isa(), "avx512") == 0;
  const Products best = !dp ? Products::kBrgemm
                            : cpu_has_amx_bf16() ? Products::kAmx : Products::kDpbf16;
  if (env == nullptr || *env == '\0') return best;
  for (Products asked : {Products::kBrgemm, Products::kDpbf16, Products::kAmx}) {
    if (std::strcmp(env, products_name(asked)) != 0) continue;
    if (asked <= best) return asked;  // the AMX path needs AVX512-BF16 as well
    TORCH_WARN("MINIGPT_CPU_BF16_PRODUCTS=", env, ": not available here; using ",
               products_name(best));
    return best;
  }
  TORCH_CHECK(false, "MINIGPT_CPU_BF16_PRODUCTS='", env,
              "' is not one of amx, avx512_bf16, brgemm (unset it for the best this CPU has)");
  return best;
}

Products bf16_products() {
  static const Products products = select_products();  // a throw leaves it unset, to throw again
  return products;
}

bool dpbf16_enabled() { return bf16_products() != Products::kBrgemm; }

// A tile product of the dot-product path (the operands of dpbf16::gemm) on AMX tiles or on
// vdpbf16ps register blocks; AMX needs a live amx::Session on this thread.
void dp_gemm(bool amx, int64_t M, int64_t N, int64_t Kp, const uint32_t* a, int64_t lda,
             const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
             const dpbf16::RowLimits& lim = {}) {
  if (amx)
    amx::gemm(M, N, Kp, a, lda, b, ldb, c, ldc, accumulate, lim);
  else
    dpbf16::gemm(M, N, Kp, a, lda, b, ldb, c, ldc, accumulate, lim);
}

// The dot-product path reads q, k, v (and dout) rows as 32-bit pairs in place: bf16, an even
// head dim, and every pointer and stride even (4-byte aligned pairs).
template <typename T>
bool use_dpbf16(const AttentionParams& p, bool backward) {
  if (!std::is_same_v<T, at::BFloat16> || !dpbf16_enabled() || p.D % 2 != 0) return false;
  auto even = [](const void* ptr, const Strides4& st) {
    return reinterpret_cast<std::uintptr_t>(ptr) % 4 == 0 && st.b % 2 == 0 && st.h % 2 == 0 &&
           st.t % 2 == 0;
  };
  return even(p.q, p.q_stride) && even(p.k, p.k_stride) && even(p.v, p.v_stride) &&
         (!backward || even(p.dout, p.dout_stride));
}

template <typename T>
const uint16_t* u16(const T* x) { return reinterpret_cast<const uint16_t*>(x); }
template <typename T>
uint16_t* u16(T* x) { return reinterpret_cast<uint16_t*>(x); }
template <typename T>
const uint32_t* words(const T* x) { return reinterpret_cast<const uint32_t*>(x); }
template <typename T>
uint32_t* words(T* x) { return reinterpret_cast<uint32_t*>(x); }


// o[d] = T(x[d] * a) for d < n, 16 lanes at a time: the dot-product path's stores of output
// rows (T is bf16 there).
template <typename T>
void store_scaled_dp(const float* x, int64_t n, float a, T* o) {
  dpbf16::store_bf16(x, n, a, u16(o));
}

// The store of output rows (store_scaled, cpu16_tiles.h) on the dot-product path or not.
template <typename T>
auto row_store(bool dp) {
  return dp ? store_scaled_dp<T> : store_scaled<T>;
}

// ---------------------------------------------------------------------------------------------
// Decode: a few query rows (Tq <= kDecodeMaxTq) against a KV cache. A GEMM of one or two rows is
// a matrix-vector product that brgemm runs poorly, and the forward's K^T copy would read the
// whole cache twice more; here each (batch, kv head) streams its keys once, converting each key
// and value row to float32 as it goes, for all G * Tq query rows of the group.

constexpr int64_t kDecodeMaxTq = 4;
constexpr int64_t kDecodeBlockK = 64;

// s[r * ld + c] = dot(qf[r], k[c]) for R rows of qf (R x D float) and nk key rows of k.
template <typename T>
MINIGPT_CLONES void decode_scores(const float* qf, int64_t R, int64_t D, const T* k, int64_t ldk,
                                  int64_t nk, float* kf, float* s, int64_t ld) {
  for (int64_t c = 0; c < nk; ++c) {
    for (int64_t d = 0; d < D; ++d) kf[d] = static_cast<float>(k[c * ldk + d]);
    for (int64_t r = 0; r < R; ++r) s[r * ld + c] = dot_row(qf + r * D, kf, D);
  }
}

// acc[r] += sum_c p[r * ld + c] * v[c] for R rows.
template <typename T>
MINIGPT_CLONES void decode_accumulate(const float* pr, int64_t R, int64_t ld, const T* v,
                                      int64_t ldv, int64_t nk, int64_t D, float* vf, float* acc) {
  for (int64_t c = 0; c < nk; ++c) {
    for (int64_t d = 0; d < D; ++d) vf[d] = static_cast<float>(v[c * ldv + d]);
    for (int64_t r = 0; r < R; ++r) {
      const float w = pr[r * ld + c];
      for (int64_t d = 0; d < D; ++d) acc[r * D + d] += w * vf[d];
    }
  }
}

template <typename T>
void run_decode(const AttentionParams& p) {
  const int64_t D = p.D, G = p.group_size(), R = G * p.Tq, BK = kDecodeBlockK;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const int64_t f_elems = R * D + 2 * D + R * BK + R * D + 2 * R;
  const int64_t pairs = p.B * p.Hkv;
  at::Tensor f_scratch = at::empty({at::get_num_threads() * f_elems},
                                   at::TensorOptions().dtype(at::kFloat));
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    float* qf = f_scratch.data_ptr<float>() + at::get_thread_num() * f_elems;  // (R, D)
    float* kf = qf + R * D;   // one key row as float
    float* vf = kf + D;       // one value row as float
    float* s = vf + D;        // (R, BK)
    float* acc = s + R * BK;  // (R, D)
    float* row_max = acc + R * D;
    float* row_sum = row_max + R;
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / p.Hkv, kvh = pair % p.Hkv;
      const RowBlock rb{kvh, G, 0, p.Tq, R};  // row r = (g, t) = (r / Tq, r % Tq)
      for (int64_t r = 0; r < R; ++r) {
        const T* qr = q + b * p.q_stride.b + rb.head(r) * p.q_stride.h + rb.pos(r) * p.q_stride.t;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(qr[d]);
      }
      std::fill(row_max, row_max + R, kNegInf);
      std::fill(row_sum, row_sum + R, 0.0f);
      std::fill(acc, acc + R * D, 0.0f);
      const T* kh = k + b * p.k_stride.b + kvh * p.k_stride.h;
      const T* vh = v + b * p.v_stride.b + kvh * p.v_stride.h;
      const int64_t key_end = visible_key_end(p, 0, p.Tq);
      for (int64_t j0 = p.first_key(0); j0 < key_end; j0 += BK) {
        const int64_t nk = std::min(BK, key_end - j0);
        decode_scores<T>(qf, R, D, kh + j0 * p.k_stride.t, p.k_stride.t, nk, kf, s, BK);
        online_softmax<T>(p, rb, s, BK, j0, nk, row_max, row_sum, acc, nullptr);
        decode_accumulate<T>(s, R, BK, vh + j0 * p.v_stride.t, p.v_stride.t, nk, D, vf, acc);
      }
      finish_rows<T>(p, rb, b, acc, row_max, row_sum);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T>
void run_forward(const AttentionParams& p) {
  if (p.Tq <= kDecodeMaxTq) return run_decode<T>(p);
  const int64_t D = p.D, G = p.group_size(), Tk = p.Tk;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // K^T of every (batch, kv head), (D, Tk) row-major: the B operand of S = Q K^T. On the
  // dot-product path, K^T packed by pack_t32 (the same size) and V packed in pairs of rows
  // (Tk rounded up to even, x D words): the B operands of S = Q K^T and O~ += P V.
  const bool dp = use_dpbf16<T>(p, false);
  const bool amx = dp && bf16_products() == Products::kAmx;
  const int64_t pairs = p.B * p.Hkv, v_words = dp ? ceil_div(Tk, 2) * D : 0;
  at::Tensor kt_buf = at::empty({pairs * D * Tk}, at::TensorOptions().dtype(scalar_type_of<T>()));
  at::Tensor vp_buf = at::empty({pairs * v_words}, at::TensorOptions().dtype(at::kInt));
  T* kt = kt_buf.data_ptr<T>();
  uint32_t* vp = words(vp_buf.data_ptr<int32_t>());
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / p.Hkv, h = pair % p.Hkv;
      const T* kh = k + b * p.k_stride.b + h * p.k_stride.h;
      if (dp) {
        dpbf16::pack_t32(Tk, D, u16(kh), p.k_stride.t, words(kt + pair * D * Tk), Tk);
        dpbf16::pack_pairs(Tk, D, u16(v + b * p.v_stride.b + h * p.v_stride.h), p.v_stride.t,
                           vp + pair * v_words);
      } else {
        transpose(Tk, D, kh, p.k_stride.t, kt + pair * D * Tk, Tk);
      }
    }
  });

  const int64_t BK = kBlockK;
  const int64_t query_tiles = ceil_div(p.Tq, kBlockQ);
  const int64_t units = pairs * query_tiles;
  std::vector<int64_t> cost(units);
  for (int64_t u = 0; u < units; ++u) {
    const int64_t r0 = (u % query_tiles) * kBlockQ, nr = std::min(kBlockQ, p.Tq - r0);
    cost[u] = 1 + ceil_div(visible_key_end(p, r0, nr) - p.first_key(r0), BK);
  }
  const std::vector<int64_t> bounds = split_by_cost(cost.data(), units, at::get_num_threads());
  const int64_t workers = static_cast<int64_t>(bounds.size()) - 1;

  // Per-worker scratch. T: the gathered Q rows (R x D) and P (R x kBlockK). float: S then P
  // (R x kBlockK), O~ (R x D), m and l.
  const int64_t R = G * kBlockQ;
  const int64_t t_elems = R * D + R * BK;
  const int64_t f_elems = R * BK + R * D + 2 * R;
  at::Tensor t_scratch =
      at::empty({workers * t_elems}, at::TensorOptions().dtype(scalar_type_of<T>()));
  at::Tensor f_scratch = at::empty({workers * f_elems}, at::TensorOptions().dtype(at::kFloat));

  // On the dot-product path under a causal mask (no ALiBi), each row's products stop at the
  // last key it sees (dpbf16::RowLimits).
  const bool limit = dp && p.causal && p.alibi_slopes == nullptr;
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    const amx::Session tiles(amx);
    const BrgemmRelease release(!dp);
    std::vector<int32_t> key_end_of_row(limit ? R : 0), pair_end(limit ? R : 0);
    const dpbf16::RowLimits s_limits{limit ? key_end_of_row.data() : nullptr};
    const dpbf16::RowLimits pv_limits{nullptr, nullptr, limit ? pair_end.data() : nullptr};
    for (int64_t w = w0; w < w1; ++w) {
      T* qbuf = t_scratch.data_ptr<T>() + w * t_elems;       // (R, D)
      T* pbuf = qbuf + R * D;                                // (R, BK): P as T
      float* s = f_scratch.data_ptr<float>() + w * f_elems;  // (R, BK) scores, then P
      float* acc = s + R * BK;                               // (R, D): O~
      float* row_max = acc + R * D;
      float* row_sum = row_max + R;

      for (int64_t u = bounds[w]; u < bounds[w + 1]; ++u) {
        const int64_t i = u % query_tiles, pair = u / query_tiles;
        const int64_t b = pair / p.Hkv, kvh = pair % p.Hkv;
        const int64_t r0 = i * kBlockQ, nr = std::min(kBlockQ, p.Tq - r0), rows = G * nr;
        const RowBlock rb{kvh, G, r0, nr, rows};
        // Stack the tile's rows of the G query heads (row r: head kvh * G + r / nr).
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t h = kvh * G + r / nr, t = r0 + r % nr;
          std::memcpy(qbuf + r * D, q + b * p.q_stride.b + h * p.q_stride.h + t * p.q_stride.t,
                      D * sizeof(T));
        }
        std::fill(row_max, row_max + rows, kNegInf);
        std::fill(row_sum, row_sum + rows, 0.0f);
        std::fill(acc, acc + rows * D, 0.0f);

        // The dot-product path starts at an even key, so that its pairs of keys are the
        // packed ones (a key before the window's first is masked like any other).
        const int64_t key_end = visible_key_end(p, r0, nr);
        const int64_t key_begin = dp ? p.first_key(r0) & ~int64_t{1} : p.first_key(r0);
        const T* kt_pair = kt + pair * D * Tk;
        const T* v_pair = v + b * p.v_stride.b + kvh * p.v_stride.h;
        for (int64_t j0 = key_begin; j0 < key_end; j0 += BK) {
          const int64_t nk = std::min(BK, key_end - j0);
          for (int64_t r = 0; limit && r < rows; ++r) {
            key_end_of_row[r] = causal_key_end(p, rb.pos(r), j0, nk);
            pair_end[r] = (key_end_of_row[r] + 1) / 2;
          }
          // S = Q K_j^T: B is the (D, nk) block of K^T.
          if (dp)
            dp_gemm(amx, rows, nk, D / 2, words(qbuf), D / 2, words(kt_pair) + j0, Tk, s, BK,
                         false, s_limits);
          else
            tile_gemm<T>(rows, nk, D, qbuf, D, kt_pair + j0, Tk, s, BK, false);
          // Online softmax per row (Alg. 1), P written as T for the product with V.
          if (dp && p.alibi_slopes == nullptr)
            dpbf16::softmax_rows(p, rb, s, BK, j0, nk, row_max, row_sum, acc,
                                 reinterpret_cast<uint16_t*>(pbuf));
          else
            online_softmax<T>(p, rb, s, BK, j0, nk, row_max, row_sum, acc, pbuf);
          // O~ += P V_j (an odd last key pairs with a zero column of P).
          if (dp) {
            if (nk % 2)
              for (int64_t r = 0; r < rows; ++r) pbuf[r * BK + nk] = T(0.0f);
            dp_gemm(amx, rows, D, (nk + 1) / 2, words(pbuf), BK / 2, vp + pair * v_words +
                         (j0 / 2) * D, D, acc, D, true, pv_limits);
          } else {
            tile_gemm<T>(rows, D, nk, pbuf, BK, v_pair + j0 * p.v_stride.t, p.v_stride.t, acc,
                         D, true);
          }
        }

        finish_rows<T>(p, rb, b, acc, row_max, row_sum, row_store<T>(dp));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward (Alg. 2).

template <typename T>
void run_backward(const AttentionParams& p) {
  const int64_t D = p.D, G = p.group_size();
  const int64_t rows = p.B * p.Hq * p.Tq;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  const bool alibi = p.alibi_slopes != nullptr;
  // The dot-product path (bf16 on AVX512-BF16, its products on AMX tiles where the CPU has
  // them; cpu/bf16_dot_tiles.h, cpu/amx_tiles.h).
  const bool dp = use_dpbf16<T>(p, true);
  const bool amx = dp && bf16_products() == Products::kAmx;
  const auto store = row_store<T>(dp);  // dK, dV and dQ rows as T

  // delta_i = rowsum(dO_i * O_i), summed in double (dP - delta cancels).
  std::vector<float> delta(rows);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % p.Tq, h = (row / p.Tq) % p.Hq, b = row / (p.Tq * p.Hq);
      const T* o = out + b * p.out_stride.b + h * p.out_stride.h + t * p.out_stride.t;
      const T* g = dout + b * p.dout_stride.b + h * p.dout_stride.h + t * p.dout_stride.t;
      if (dp) {
        delta[row] = dpbf16::dot_bf16_double(u16(o), u16(g), D);
        continue;
      }
      double sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += static_cast<double>(o[d]) * static_cast<float>(g[d]);
      delta[row] = static_cast<float>(sum);
    }
  });

  constexpr int64_t BK = kBwdBlock, BQ = kBwdBlock;
  const int64_t key_tiles = ceil_div(p.Tk, BK);
  const int64_t pairs = p.B * p.Hkv;
  const int64_t units = pairs * key_tiles;
  std::vector<int64_t> cost(units);
  for (int64_t u = 0; u < units; ++u) {
    const int64_t j0 = (u % key_tiles) * BK;
    const int64_t end = query_tile_end(p, j0, std::min(BK, p.Tk - j0), BQ);
    cost[u] = 1 + G * std::max<int64_t>(0, end - first_query_tile(p, j0, BQ));
  }
  const std::vector<int64_t> bounds = split_by_cost(cost.data(), units, at::get_num_threads());
  const int64_t workers = static_cast<int64_t>(bounds.size()) - 1;
  const int64_t head_size = p.Tq * D;

  // Worker w's float32 dQ part covers the (batch, kv head) pairs its units touch.
  auto pair_first = [&](int64_t w) { return bounds[w] / key_tiles; };
  auto pair_last = [&](int64_t w) { return (bounds[w + 1] - 1) / key_tiles; };
  std::vector<int64_t> part_offset(workers + 1, 0);
  for (int64_t w = 0; w < workers; ++w)
    part_offset[w + 1] = part_offset[w] + (bounds[w] == bounds[w + 1]
                                               ? 0
                                               : (pair_last(w) - pair_first(w) + 1) * G * head_size);
  at::Tensor dq_parts = at::zeros({part_offset[workers]}, at::TensorOptions().dtype(at::kFloat));

  // The dot-product path's B operands from Q and dO, which every key tile reads: packed once
  // per query head in pairs of rows (cpu/bf16_dot_tiles.h; ceil(Tq/2) x D words). Those from K
  // and V are packed per key tile, by the one unit that reads them.
  const int64_t qp_words = dp ? ceil_div(p.Tq, 2) * D : 0;
  at::Tensor packs = at::empty({2 * p.B * p.Hq * qp_words}, at::TensorOptions().dtype(at::kInt));
  uint32_t* qpair = words(packs.data_ptr<int32_t>());
  uint32_t* dopair = qpair + p.B * p.Hq * qp_words;
  if (dp) {
    at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p.Hq, h = bh % p.Hq;
        dpbf16::pack_pairs(p.Tq, D, u16(q + b * p.q_stride.b + h * p.q_stride.h), p.q_stride.t,
                           qpair + bh * qp_words);
        dpbf16::pack_pairs(p.Tq, D, u16(dout + b * p.dout_stride.b + h * p.dout_stride.h),
                           p.dout_stride.t, dopair + bh * qp_words);
      }
    });
  }

  // Per-worker scratch. T: K_j^T and V_j^T (D x BK), P and dS (BQ x BK) and their transposes
  // (BK x BQ), and (dot-product path) K_j in pairs of rows (BK x D). float: S then P, dP
  // (BQ x BK), and the dK and dV accumulators (BK x D).
  const int64_t t_elems = 3 * D * BK + 4 * BQ * BK;
  const int64_t f_elems = 2 * BQ * BK + 2 * BK * D;
  at::Tensor t_scratch =
      at::empty({workers * t_elems}, at::TensorOptions().dtype(scalar_type_of<T>()));
  at::Tensor f_scratch = at::empty({workers * f_elems}, at::TensorOptions().dtype(at::kFloat));

  // On the dot-product path under a causal mask (no ALiBi), the tile products skip what the
  // mask zeroes (dpbf16::RowLimits): a query row's scores stop at its last visible key, and a
  // key row's dV and dK sums start at the first query that sees it.
  const bool limit = dp && p.causal && !alibi;
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    const amx::Session tiles(amx);
    const BrgemmRelease release(!dp);
    std::vector<int32_t> key_end(limit ? BQ : 0), pair_end(limit ? BQ : 0),
        first_pair(limit ? BK : 0);
    const dpbf16::RowLimits s_limits{limit ? key_end.data() : nullptr};
    const dpbf16::RowLimits dq_limits{nullptr, nullptr, limit ? pair_end.data() : nullptr};
    const dpbf16::RowLimits dkv_limits{nullptr, limit ? first_pair.data() : nullptr, nullptr};
    for (int64_t w = w0; w < w1; ++w) {
      if (bounds[w] == bounds[w + 1]) continue;
      float* part = dq_parts.data_ptr<float>() + part_offset[w];
      T* kt = t_scratch.data_ptr<T>() + w * t_elems;  // (D, nk) K_j^T
      T* vt = kt + D * BK;                            // (D, nk) V_j^T
      T* pb = vt + D * BK;                            // (nq, BK) P as T
      T* dsb = pb + BQ * BK;                          // (nq, BK) dS as T
      T* pbt = dsb + BQ * BK;                         // (nk, BQ) P^T
      T* dsbt = pbt + BQ * BK;                        // (nk, BQ) dS^T
      uint32_t* kpair = words(dsbt + BQ * BK);        // (ceil(nk / 2), D) K_j in pairs of rows
      float* s = f_scratch.data_ptr<float>() + w * f_elems;  // (nq, BK) S, then P
      float* dpt = s + BQ * BK;                              // (nq, BK) dP
      float* dk_acc = dpt + BQ * BK;
      float* dv_acc = dk_acc + BK * D;

      for (int64_t u = bounds[w]; u < bounds[w + 1]; ++u) {
        const int64_t pair = u / key_tiles, b = pair / p.Hkv, kvh = pair % p.Hkv;
        const int64_t j0 = (u % key_tiles) * BK, nk = std::min(BK, p.Tk - j0);
        const T* kj = k + b * p.k_stride.b + kvh * p.k_stride.h + j0 * p.k_stride.t;
        const T* vj = v + b * p.v_stride.b + kvh * p.v_stride.h + j0 * p.v_stride.t;
        // B operands of this key tile: K_j^T and V_j^T (D x nk); K_j is read in place, or
        // packed in pairs of rows on the dot-product path.
        if (dp) {
          dpbf16::pack_t32(nk, D, u16(kj), p.k_stride.t, words(kt), BK);
          dpbf16::pack_t32(nk, D, u16(vj), p.v_stride.t, words(vt), BK);
          dpbf16::pack_pairs(nk, D, u16(kj), p.k_stride.t, kpair);
        } else {
          transpose(nk, D, kj, p.k_stride.t, kt, nk);
          transpose(nk, D, vj, p.v_stride.t, vt, nk);
        }
        std::fill(dk_acc, dk_acc + nk * D, 0.0f);
        std::fill(dv_acc, dv_acc + nk * D, 0.0f);

        const int64_t i_begin = first_query_tile(p, j0, BQ), i_end = query_tile_end(p, j0, nk, BQ);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = kvh * G + g;
          const float slope = alibi ? p.alibi_slopes[h] : 0.0f;
          float* dq_head = part + ((pair - pair_first(w)) * G + g) * head_size;
          for (int64_t i = i_begin; i < i_end; ++i) {
            const int64_t r0 = i * BQ, nq = std::min(BQ, p.Tq - r0);
            const T* qi = q + b * p.q_stride.b + h * p.q_stride.h + r0 * p.q_stride.t;
            const T* doi = dout + b * p.dout_stride.b + h * p.dout_stride.h + r0 * p.dout_stride.t;
            for (int64_t r = 0; limit && r < nq; ++r) {
              key_end[r] = causal_key_end(p, r0 + r, j0, nk);
              pair_end[r] = (key_end[r] + 1) / 2;
            }
            for (int64_t c = 0; limit && c < nk; ++c)
              first_pair[c] = causal_first_query(p, j0 + c, r0, nq) / 2;
            // S = Q_i K_j^T and dP = dO_i V_j^T.
            if (dp) {
              dp_gemm(amx, nq, nk, D / 2, words(qi), p.q_stride.t / 2,
                           words(kt), BK, s, BK, false, s_limits);
              dp_gemm(amx, nq, nk, D / 2, words(doi), p.dout_stride.t / 2,
                           words(vt), BK, dpt, BK, false, s_limits);
            } else {
              tile_gemm<T>(nq, nk, D, qi, p.q_stride.t, kt, nk, s, BK, false);
              tile_gemm<T>(nq, nk, D, doi, p.dout_stride.t, vt, nk, dpt, BK, false);
            }
            const int64_t row0 = (b * p.Hq + h) * p.Tq + r0;
            if (dp && !alibi)  // P and dS in one pass per row
              dpbf16::backward_rows(p, s, dpt, BK, nq, r0, j0, nk, p.lse + row0,
                                    delta.data() + row0, reinterpret_cast<uint16_t*>(pb),
                                    reinterpret_cast<uint16_t*>(dsb));
            else
              for (int64_t r = 0; r < nq; ++r) {
                float* sr = s + r * BK;
                transform_row(p, sr, nk, r0 + r, j0, slope, alibi);
                const float lse = p.lse[row0 + r];
                // P = exp(S - lse); a row with no visible key (lse = -inf) has P = 0.
                const float m = lse == kNegInf ? std::numeric_limits<float>::infinity() : lse;
                exp_row<T>(sr, m, nk, pb + r * BK);
                ds_row<T>(sr, dpt + r * BK, delta[row0 + r], p.scale, nk, dsb + r * BK);
              }
            // dV_j += P^T dO_i, dK_j += dS^T Q_i (dS carries the scale), dQ_i += dS K_j.
            if (dp) {
              // P^T and dS^T with rows paired (an odd last row pairs with zeros); an odd last
              // key pairs with a zero column of dS.
              dpbf16::pack_pairs_transposed(nq, nk, u16(pb), BK, words(pbt), BQ / 2);
              dpbf16::pack_pairs_transposed(nq, nk, u16(dsb), BK, words(dsbt), BQ / 2);
              for (int64_t r = 0; r < nq && nk % 2; ++r) dsb[r * BK + nk] = T(0.0f);
              const uint32_t* dop = dopair + (b * p.Hq + h) * qp_words + (r0 / 2) * D;
              const uint32_t* qp = qpair + (b * p.Hq + h) * qp_words + (r0 / 2) * D;
              dp_gemm(amx, nk, D, (nq + 1) / 2, words(pbt), BQ / 2, dop, D, dv_acc, D, true,
                           dkv_limits);
              dp_gemm(amx, nk, D, (nq + 1) / 2, words(dsbt), BQ / 2, qp, D, dk_acc, D, true,
                           dkv_limits);
              dp_gemm(amx, nq, D, (nk + 1) / 2, words(dsb), BK / 2,
                           kpair, D, dq_head + r0 * D, D, true, dq_limits);
            } else {
              transpose(nq, nk, pb, BK, pbt, BQ);
              transpose(nq, nk, dsb, BK, dsbt, BQ);
              tile_gemm<T>(nk, D, nq, pbt, BQ, doi, p.dout_stride.t, dv_acc, D, true);
              tile_gemm<T>(nk, D, nq, dsbt, BQ, qi, p.q_stride.t, dk_acc, D, true);
              tile_gemm<T>(nq, D, nk, dsb, BK, kj, p.k_stride.t, dq_head + r0 * D, D, true);
            }
          }
        }
        T* dkj = static_cast<T*>(p.dk) + b * p.dk_stride.b + kvh * p.dk_stride.h +
                 j0 * p.dk_stride.t;
        T* dvj = static_cast<T*>(p.dv) + b * p.dv_stride.b + kvh * p.dv_stride.h +
                 j0 * p.dv_stride.t;
        for (int64_t c = 0; c < nk; ++c) {
          store(dk_acc + c * D, D, 1.0f, dkj + c * p.dk_stride.t);
          store(dv_acc + c * D, D, 1.0f, dvj + c * p.dv_stride.t);
        }
      }
    }
  });

  // dQ = sum over workers, in worker order, of the parts covering each (batch, kv head) pair.
  T* dq = static_cast<T*>(p.dq);
  const float* parts_base = dq_parts.data_ptr<float>();
  at::parallel_for(0, pairs * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(head_size);
    for (int64_t pg = begin; pg < end; ++pg) {
      const int64_t pair = pg / G, g = pg % G;
      const int64_t h = (pair % p.Hkv) * G + g, b = pair / p.Hkv;
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t w = 0; w < workers; ++w) {
        if (bounds[w] == bounds[w + 1] || pair < pair_first(w) || pair > pair_last(w)) continue;
        const float* part = parts_base + part_offset[w] + ((pair - pair_first(w)) * G + g) * head_size;
        for (int64_t x = 0; x < head_size; ++x) sum[x] += part[x];
      }
      T* dq_h = dq + b * p.dq_stride.b + h * p.dq_stride.h;
      for (int64_t t = 0; t < p.Tq; ++t)
        store(sum.data() + t * D, D, 1.0f, dq_h + t * p.dq_stride.t);
    }
  });
}

}  // namespace

const char* attention_cpu16_products() { return products_name(bf16_products()); }

void attention_forward_cpu16(const AttentionParams& p) {
  if (p.dtype == DType::BFloat16)
    run_forward<at::BFloat16>(p);
  else
    run_forward<at::Half>(p);
}

void attention_backward_cpu16(const AttentionParams& p) {
  if (p.dtype == DType::BFloat16)
    run_backward<at::BFloat16>(p);
  else
    run_backward<at::Half>(p);
}

}  // namespace minigpt
