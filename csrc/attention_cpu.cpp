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
// micro-kernel (kRowBlock rows x kColVecs vectors of columns held in registers across the inner
// loop), and exp. They live in cpu/attention_tiles.h, written with GCC/Clang vector extensions
// of a width set by the includer, and this file includes them three times, each time in a
// namespace of its own compiled for one instruction set (#pragma GCC target):
//   avx512     64-byte vectors (16 floats, one zmm register), a 6 x 4 register block, for CPUs
//              with AVX-512 F/BW/VL/DQ;
//   avx2       32-byte vectors (8 floats, one ymm register), a 6 x 2 block, for AVX2 + FMA;
//   portable   32-byte vectors that the compiler splits into baseline SSE2 halves (or NEON on
//              ARM), for any CPU.
// The host drivers pick one at run time (cpu_isa(): the best the CPU supports, or the one
// MINIGPT_CPU_ISA names) and call its entry points through function pointers. Intrinsics could
// not be shared like that: one source per width would be needed.
#include "attention.h"
#include "attention_cpu_common.h"

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace minigpt {
namespace {

#define MINIGPT_INLINE inline __attribute__((always_inline))

// Query rows and keys per tile. 64 x 64 float scores (16 KiB) plus the operand rows stay in the
// 32 KiB L1 data cache of current x86 cores.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;

// GCC notes (-Wpsabi) that passing vectors wider than 16 bytes by value differs between
// instruction sets. Such calls stay inside one ISA namespace below, compiled for one target, so no
// call crosses an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define MINIGPT_HAVE_SHUFFLEVECTOR 1
#endif
#endif


template <typename T>
MINIGPT_INLINE T softmax_scale(const AttentionParams& p) {
  if (std::is_same_v<T, double> && p.scale_fp64 != 0.0) return static_cast<T>(p.scale_fp64);
  return static_cast<T>(p.scale);
}


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
  return 2 * D * kBlockK + 2 * kBlockQ * kBlockK + 3 * kBlockK * D;
}

// Whether the forward copies K and V rows side by side (rows of a head not adjacent in memory,
// as in the model's (B, T, H, D) layout), and the backward Q and dO rows; then each worker also
// holds one kv head's K and V (forward) or one group's Q and dO (backward), after its tile
// buffers.
bool packs_kv(const AttentionParams& p) { return p.k_stride.t != p.D || p.v_stride.t != p.D; }
bool packs_q_dout(const AttentionParams& p) {
  return p.q_stride.t != p.D || p.dout_stride.t != p.D;
}
int64_t forward_worker_scratch(const AttentionParams& p) {
  return forward_tile_scratch(p.D) + (packs_kv(p) ? 2 * p.Tk * p.D : 0);
}
int64_t backward_worker_scratch(const AttentionParams& p) {
  return backward_tile_scratch(p.D) + (packs_q_dout(p) ? 2 * p.group_size() * p.Tq * p.D : 0);
}

// ---------------------------------------------------------------------------------------------
// Work partition.

// split_by_cost, visible_key_end, first_query_tile and query_tile_end: attention_cpu_common.h.

// Runs body(w, bounds[w], bounds[w + 1]) for every range, one range per thread.
template <typename F>
void run_ranges(const std::vector<int64_t>& bounds, const F& body) {
  const int64_t ranges = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, ranges, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) body(w, bounds[w], bounds[w + 1]);
  });
}

// ALiBi (Press et al. 2022): head h's score of query row i and key j becomes
// scale * s - slope * (i + causal_offset() - j). The kernels apply it to a tile of raw scores s
// in place, scale included, and then use a scale of 1 for that tile.
template <typename T>
MINIGPT_INLINE T alibi_score(T s, T scale, T slope, int64_t distance) {
  return s * scale - slope * static_cast<T>(distance);
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

#include "cpu/isa_paths.h"

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
  const auto kernel = decode_kernel<T, LseT>();  // on this thread: it may throw
  run_ranges(bounds, [&](int64_t w, int64_t u0, int64_t u1) {
    T* s = scratch.data() + w * tile_scratch;
    kernel(p, sp, out, os, lse, part_acc.data(), part_stat.data(), s, u0, u1);
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
  const int64_t tile_scratch = forward_worker_scratch(p);
  Scratch<T> scratch((static_cast<int64_t>(bounds.size()) - 1) * tile_scratch);
  const auto kernel = forward_kernel<T, LseT>();  // on this thread: it may throw
  run_ranges(bounds, [&](int64_t w, int64_t u0, int64_t u1) {
    T* s = scratch.data() + w * tile_scratch;
    kernel(p, out, os, lse, s, u0, u1);
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
    const int64_t end = query_tile_end(p, j0, std::min(kBlockK, p.Tk - j0), kBlockQ);
    cost.data()[u] = 1 + G * std::max<int64_t>(0, end - first_query_tile(p, j0, kBlockQ));
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
  const int64_t tile_scratch = backward_worker_scratch(p);
  Scratch<T> scratch(workers * tile_scratch);
  const auto kernel = backward_kernel<T>();  // on this thread: it may throw
  run_ranges(bounds, [&](int64_t w, int64_t u0, int64_t u1) {
    if (u0 == u1) return;
    T* part = dq_parts.data() + part_offset[w];
    std::fill(part, dq_parts.data() + part_offset[w + 1], T(0));
    T* s = scratch.data() + w * tile_scratch;
    kernel(p, lse, delta.data(), part, s, pair_first(w), u0, u1);
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

const char* attention_cpu_isa() { return isa_name(cpu_isa()); }

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
