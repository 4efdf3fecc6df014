// minigpt attention forward on CUDA: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster
// Attention with Better Parallelism and Work Partitioning"), Algorithm 1.
//
// For one query row q_i (natural-log softmax with scale s; keys j in order, tile by tile):
//   S_ij = s * q_i . k_j + b_ij                            (masked: -inf when j >= Tk or, causal,
//                                                            j > i + Tk - Tq or, with a window W,
//                                                            j <= i + Tk - Tq - W)
//   m_i^(n) = max(m_i^(n-1), rowmax(S_i,tile n))           (Alg. 1 line 10)
//   P_ij    = exp(S_ij - m_i^(n))
//   l_i^(n) = exp(m_i^(n-1) - m_i^(n)) l_i^(n-1) + rowsum(P_i,tile n)
//   O_i^(n) = exp(m_i^(n-1) - m_i^(n)) O_i^(n-1) + P_i,tile n V_tile n   (unnormalised, line 10)
//   O_i = O_i^(last) / l_i^(last),  L_i = m_i^(last) + log l_i^(last)    (lines 12-13)
// The kernels work in base 2: S is multiplied by s * log2(e) so every exp is one exp2f, and
// L_i = ln(2) * m2_i + ln(l_i). L (lse) is stored as float32 (B, Hq, Tq) for the backward.
// b_ij is ALiBi's bias (0 without it); with a window, only the key tiles that some row of a block
// can see are loaded (key_tiles in common.cuh).
//
// bf16/fp16: one CTA per (tile of BM packed rows, kv head, batch); 4 warps (BM = 64) or 1 warp
// (BM = 16, for decode-sized problems), each warp owning 16 rows. S = Q K^T and O += P V run on
// tensor cores (mma.sync m16n8k16, fp32 accumulators); the softmax stays in registers; K/V tiles
// of BN = 64 rows stream through shared memory with cp.async double buffering.
// Rows are packed per GQA group: row r of kv head h_kv is query head h_kv * G + r / Tq, position
// r % Tq, so a decode step (Tq = 1) puts all G query heads of a group into one small tile.
//
// float32: a CUDA-core kernel (no tensor cores): 16 rows x 32 keys per step, one warp per row for
// the scores and softmax (lane = key), every thread accumulating D/8 output columns of one row.
//
// The v1 kernel set (MINIGPT_CUDA_KERNELS=v1): the tensor-core kernels of the first GPU run
// (H100), selectable beside the current set (attention_fwd.cu), which is faster on an H200; the
// float32 kernel (fwd_f32.cuh) is the same in both sets.
#include "common.cuh"
#include "kernel_sets.h"

namespace minigpt {
namespace gpu {
namespace v1 {
namespace {

// ----------------------------------------------------------------------------------------------
// bf16 / fp16 tensor-core forward.

template <typename T, int D, int BM, int BN>
struct FwdTraits {
  static constexpr int kWarps = BM / 16;
  static constexpr int kThreads = kWarps * 32;
  // Shared rows padded by 16 bytes: the 8 row addresses of one ldmatrix land on distinct banks.
  static constexpr int kStride = D + 8;
  static constexpr size_t kSmemBytes = static_cast<size_t>(BM + 4 * BN) * kStride * sizeof(T);
  static_assert(D % 16 == 0 && BN % 16 == 0 && BM % 16 == 0, "tile sizes");
};

template <typename T, int D, int BM, int BN, bool CAUSAL>
__global__ void __launch_bounds__(BM / 16 * 32)
    attention_fwd_kernel(const AttentionParams p) {
  using Tr = FwdTraits<T, D, BM, BN>;
  constexpr int kS = Tr::kStride;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row

  T* sQ = dynamic_smem<T>();  // [BM][kS]
  T* sK = sQ + BM * kS;       // [2][BN][kS]
  T* sV = sK + 2 * BN * kS;   // [2][BN][kS]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;   // fragment row group
  const int tq = lane % 4;  // thread in quad

  const int64_t group = p.Hq / p.Hkv;
  const int64_t rows = group * p.Tq;  // packed (head in group, query) rows of this kv head
  // Heaviest (causal) tiles first: the last row tiles see the most keys.
  const int64_t r0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * BM;
  const int64_t hkv = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t offset = p.Tk - p.Tq;  // query i sees keys j <= i + offset

  // Query positions covered by this tile (a tile may straddle two heads of the group).
  const int64_t r_last = min64(r0 + BM, rows) - 1;
  const bool straddle = r0 / p.Tq != r_last / p.Tq;
  const int64_t i_min = straddle ? 0 : r0 % p.Tq;
  const int64_t i_max = straddle ? p.Tq - 1 : r_last % p.Tq;
  const TileRuns tiles = key_tiles<CAUSAL>(p, r0, r_last, BN);
  const int n_steps = tiles.count();
  // Keys before this are hidden from some row by the window: tiles starting earlier need the mask.
  const int64_t window_mask_below = CAUSAL && p.window > 0 ? first_key(p, i_max) : 0;

  // Q tile: one cp.async group.
  const T* q_base = static_cast<const T*>(p.q) + b * p.q_stride.b;
  for (int c = tid; c < BM * kChunks; c += kThreads) {
    const int row = c / kChunks;
    const int ch = c % kChunks;
    const int64_t r = r0 + row;
    const bool valid = r < rows;
    const T* src = q_base;
    if (valid) {
      const PackedRow pr = unpack_row(r, hkv, group, p.Tq);
      src += pr.head * p.q_stride.h + pr.i * p.q_stride.t + ch * 8;
    }
    cp_async_16(sQ + row * kS + ch * 8, src, valid);
  }
  cp_async_commit();

  const T* k_base = static_cast<const T*>(p.k) + b * p.k_stride.b + hkv * p.k_stride.h;
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_stride.b + hkv * p.v_stride.h;
  auto load_kv = [&](int n, int stage) {
    T* dk = sK + stage * BN * kS;
    T* dv = sV + stage * BN * kS;
    for (int c = tid; c < BN * kChunks; c += kThreads) {
      const int row = c / kChunks;
      const int ch = c % kChunks;
      const int64_t j = static_cast<int64_t>(n) * BN + row;
      const bool valid = j < p.Tk;
      cp_async_16(dk + row * kS + ch * 8, valid ? k_base + j * p.k_stride.t + ch * 8 : k_base, valid);
      cp_async_16(dv + row * kS + ch * 8, valid ? v_base + j * p.v_stride.t + ch * 8 : v_base, valid);
    }
  };
  if (n_steps > 0) load_kv(tiles.at(0), 0);
  cp_async_commit();

  cp_async_wait<1>();  // the Q group has landed
  __syncthreads();
  uint32_t qf[D / 16][4];  // this warp's 16 Q rows as A fragments, kept for the whole kernel
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], sQ + lds_row_a(warp * 16, kk * 16, kS, lane));

  // The two rows this thread holds in C fragments: h = 0 -> row g, h = 1 -> row g + 8.
  int64_t last_key[2], first_vis[2];
  float slope[2];  // ALiBi slope * log2(e) of the row's head
  const bool alibi = p.alibi_slopes != nullptr;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = r0 + warp * 16 + g + 8 * h;
    // Rows past the end are computed on zeros and never stored; any finite limit will do.
    const PackedRow pr = unpack_row(r < rows ? r : rows - 1, hkv, group, p.Tq);
    last_key[h] = pr.i + offset;
    first_vis[h] = CAUSAL ? first_key(p, pr.i) : 0;
    slope[h] = alibi_slope_log2(p, pr.head);
  }

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of S * scale * log2(e)
  float l_run[2] = {0.f, 0.f};              // this thread's part of the running row sum
  const float scale_log2 = p.scale * kLog2e;

  for (int step = 0; step < n_steps; ++step) {
    const int stage = step & 1;
    if (step + 1 < n_steps) load_kv(tiles.at(step + 1), stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this step's tile has landed
    __syncthreads();
    const T* cK = sK + stage * BN * kS;
    const T* cV = sV + stage * BN * kS;

    // S = Q K^T: B[k = d][n = key] = K[key][d], so K rows load as B fragments directly.
    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t kb[4];
        ldsm_x4(kb, cK + lds_row_b(np * 16, kk * 16, kS, lane));
        mma_16816<T>(s[2 * np], qf[kk], kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // Online softmax (Alg. 1 line 10), base 2.
    const int64_t n0 = static_cast<int64_t>(tiles.at(step)) * BN;
    const bool need_mask = n0 + BN > p.Tk || (CAUSAL && n0 + BN - 1 > i_min + offset) ||
                           n0 < window_mask_below;
    // j - i' of column 2 tq of this tile for each of the two rows (ALiBi).
    const float dist0[2] = {static_cast<float>(n0 + 2 * tq - last_key[0]),
                            static_cast<float>(n0 + 2 * tq - last_key[1])};
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale_log2;
        if (alibi) x = fmaf(slope[e >> 1], dist0[e >> 1] + static_cast<float>(nt * 8 + (e & 1)), x);
        if (need_mask) {
          const int64_t j = n0 + nt * 8 + 2 * tq + (e & 1);
          if (j >= p.Tk || (CAUSAL && (j > last_key[e >> 1] || j < first_vis[e >> 1])))
            x = -INFINITY;
        }
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float base[2], corr[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(m_run[h], quad_max(mx[h]));
      // A row with no visible key so far keeps m = -inf; subtracting 0 instead avoids inf - inf.
      base[h] = m_new == -INFINITY ? 0.f : m_new;
      corr[h] = exp2f(m_run[h] - base[h]);
      m_run[h] = m_new;
      l_run[h] *= corr[h];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);
        l_run[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dt][e] *= corr[e >> 1];

    // O += P V: P from registers as A; B[k = key][n = d] = V[key][d] needs ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, cV + lds_row_a(kk * 16, dp * 16, kS, lane));
        mma_16816<T>(o[2 * dp], a, vb[0], vb[1]);
        mma_16816<T>(o[2 * dp + 1], a, vb[2], vb[3]);
      }
    }
    __syncthreads();  // all warps are done with this stage before it is refilled
  }
  cp_async_wait<0>();

  // Epilogue (Alg. 1 lines 12-13): O / l and L = ln 2 * m + ln l.
  T* out_base = static_cast<T*>(p.out) + b * p.out_stride.b;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float l = quad_sum(l_run[h]);
    const int64_t r = r0 + warp * 16 + g + 8 * h;
    if (r >= rows) continue;
    const PackedRow pr = unpack_row(r, hkv, group, p.Tq);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* dst = out_base + pr.head * p.out_stride.h + pr.i * p.out_stride.t;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      store_b32(dst + dt * 8 + 2 * tq, pack2<T>(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv));
    if (tq == 0)
      p.lse[(b * p.Hq + pr.head) * p.Tq + pr.i] = l > 0.f ? m_run[h] * kLn2 + logf(l) : -INFINITY;
  }
}

// The float32 kernel is the same in both kernel sets: fwd_f32.cuh.
#include "fwd_f32.cuh"

// ----------------------------------------------------------------------------------------------
// Launchers.

template <typename T, int D, bool CAUSAL, int BM>
int launch_fwd_half(const AttentionParams& p, cudaStream_t stream) {
  constexpr int BN = 64;
  using Tr = FwdTraits<T, D, BM, BN>;
  const int64_t tiles = ceil_div(p.Hq / p.Hkv * p.Tq, BM);
  if (tiles > 0x7fffffff || p.Hkv > 65535) return kErrGrid;
  auto kernel = attention_fwd_kernel<T, D, BM, BN, CAUSAL>;
  if (int err = prepare_smem(kernel, Tr::kSmemBytes)) return err;
  return launch(kernel, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.Hkv),
                             static_cast<unsigned>(p.B)),
                dim3(Tr::kThreads), Tr::kSmemBytes, stream, p);
}

template <typename T, int D, bool CAUSAL>
int run_fwd_half(const AttentionParams& p, cudaStream_t stream) {
  if (int err = require_sm80()) return err;
  // cp.async moves 16-byte row chunks; outputs are written two elements at a time.
  const int64_t eb = sizeof(T);
  if (!rows_aligned(p.q, p.q_stride, p.B, p.Hq, p.Tq, eb, 16) ||
      !rows_aligned(p.k, p.k_stride, p.B, p.Hkv, p.Tk, eb, 16) ||
      !rows_aligned(p.v, p.v_stride, p.B, p.Hkv, p.Tk, eb, 16) ||
      !rows_aligned(p.out, p.out_stride, p.B, p.Hq, p.Tq, eb, 4))
    return kErrAlignment;
  // Few packed rows (decode): a 1-warp, 16-row tile instead of wasting most of a 64-row one.
  if (p.Hq / p.Hkv * p.Tq <= 16) return launch_fwd_half<T, D, CAUSAL, 16>(p, stream);
  return launch_fwd_half<T, D, CAUSAL, 64>(p, stream);
}

template <int D, bool CAUSAL>
int run_fwd_f32(const AttentionParams& p, cudaStream_t stream) {
  using Tr = FwdF32Traits<D>;
  const int64_t tiles = ceil_div(p.Hq / p.Hkv * p.Tq, Tr::BM);
  if (tiles > 0x7fffffff || p.Hkv > 65535) return kErrGrid;
  auto kernel = attention_fwd_f32_kernel<D, CAUSAL>;
  if (int err = prepare_smem(kernel, Tr::kSmemBytes)) return err;
  return launch(kernel, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.Hkv),
                             static_cast<unsigned>(p.B)),
                dim3(Tr::kThreads), Tr::kSmemBytes, stream, p);
}

}  // namespace
}  // namespace v1
}  // namespace gpu

int v1::attention_forward_cuda(const AttentionParams& p, void* stream_ptr) {
  using namespace gpu;
  using namespace gpu::v1;
  if (int err = check_sizes(p)) return err;
  if (p.B == 0 || p.Hq == 0 || p.Tq == 0) return kSuccess;  // empty output
  // With Tk == 0 the kernels never touch k and v (empty tensors may have null data).
  if (p.q == nullptr || p.out == nullptr || p.lse == nullptr ||
      (p.Tk > 0 && (p.k == nullptr || p.v == nullptr)))
    return kErrNullPointer;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.dtype == DType::Float32) {
    return MINIGPT_HEADDIM_SWITCH(p.D, kD, [&] {
      return MINIGPT_BOOL_SWITCH(p.causal, kCausal, [&] { return run_fwd_f32<kD, kCausal>(p, stream); });
    });
  }
  return MINIGPT_HALF_SWITCH(p.dtype, T, [&] {
    return MINIGPT_HEADDIM_SWITCH(p.D, kD, [&] {
      return MINIGPT_BOOL_SWITCH(p.causal, kCausal,
                                 [&] { return run_fwd_half<T, kD, kCausal>(p, stream); });
    });
  });
}

}  // namespace minigpt
