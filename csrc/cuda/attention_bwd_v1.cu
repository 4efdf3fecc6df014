// minigpt attention backward on CUDA: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster
// Attention with Better Parallelism and Work Partitioning"), Algorithm 2.
//
// With S = s Q K^T (s the softmax scale), P = softmax(S) recomputed from the forward's
// log-sum-exp L (P_ij = exp(S_ij - L_i), Alg. 2 line 11) and dO the output gradient:
//   D_i  = rowsum(dO_i * O_i)                       (line 4; "delta", stored in p.delta)
//   dV_j = sum_i P_ij dO_i                          (line 12)
//   dP   = dO V^T                                   (line 13)
//   dS   = P * (dP - D)   (elementwise, D per row)  (line 14)
//   dQ_i = s * sum_j dS_ij K_j                      (line 15)
//   dK_j = s * sum_i dS_ij Q_i                      (line 16)
// Grouped-query attention: dK and dV of a kv head sum over the G query heads of its group.
// ALiBi's bias is a constant of S (no gradient of its own): P is recomputed with it, as in the
// forward. With a window, the dK/dV kernels visit only the query tiles that can see their key
// tile, and the dQ kernels only the key tiles their queries can see.
//
// Kernels (bf16/fp16 on tensor cores, mma.sync m16n8k16 with fp32 accumulators):
//   1. delta: one warp per row.
//   2. dK/dV: one CTA per (key tile of 64, kv head, batch), 4 warps of 16 keys; loops over the
//      group's query heads and the query tiles that can see the key tile, keeping dK and dV in
//      registers (the transposed scores S^T, P^T, dP^T, dS^T are computed directly so each warp's
//      16 keys are the mma rows). Unless deterministic, dQ += dS K is added with float atomics into
//      p.dq_accum; a last kernel scales dq_accum into p.dq's dtype.
//   3. deterministic: a separate dQ kernel, one CTA per (query tile of 64, query head, batch),
//      loops over key tiles in order and writes p.dq directly; no atomics anywhere.
// float32 runs the same three steps with CUDA-core kernels (no tensor cores).
//
// The v1 kernel set (MINIGPT_CUDA_KERNELS=v1): the kernels of the first GPU run (H100), kept
// unchanged and selectable until the current set (attention_bwd.cu) has run on a GPU.
#include "common.cuh"
#include "kernel_sets.h"

namespace minigpt {
namespace gpu {
namespace v1 {
namespace {

// ----------------------------------------------------------------------------------------------
// delta = rowsum(dO * O), any dtype.

template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(const AttentionParams p) {
  constexpr int kRowsPerBlock = 256 / 32;
  const int lane = threadIdx.x % 32;
  const int64_t n_rows = p.B * p.Hq * p.Tq;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
       row < n_rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t i = row % p.Tq;
    const int64_t h = (row / p.Tq) % p.Hq;
    const int64_t b = row / (p.Tq * p.Hq);
    const T* o = static_cast<const T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h +
                 i * p.out_stride.t;
    const T* d = static_cast<const T*>(p.dout) + b * p.dout_stride.b + h * p.dout_stride.h +
                 i * p.dout_stride.t;
    float acc = 0.f;
    for (int64_t c = lane; c < p.D; c += 32) acc += to_float(o[c]) * to_float(d[c]);
    acc = warp_sum(acc);
    if (lane == 0) p.delta[row] = acc;  // row == (b * Hq + h) * Tq + i
  }
}

// dq = scale * dq_accum in dq's dtype (dq_accum is contiguous (B, Hq, Tq, D) float32).
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert_kernel(const AttentionParams p) {
  const int64_t total = p.B * p.Hq * p.Tq * p.D;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % p.D;
    const int64_t i = (idx / p.D) % p.Tq;
    const int64_t h = (idx / (p.D * p.Tq)) % p.Hq;
    const int64_t b = idx / (p.D * p.Tq * p.Hq);
    static_cast<T*>(p.dq)[b * p.dq_stride.b + h * p.dq_stride.h + i * p.dq_stride.t + d] =
        from_float<T>(p.dq_accum[idx] * p.scale);
  }
}

// ----------------------------------------------------------------------------------------------
// bf16 / fp16 dK, dV (and atomic dQ) on tensor cores.

template <typename T, int D, int BM>
struct BwdTraits {
  static constexpr int BN = 64;  // keys per CTA: 4 warps x 16
  static constexpr int kThreads = 128;
  static constexpr int kStride = D + 8;    // padded rows (see FwdTraits)
  static constexpr int kStrideDS = BM + 8;  // dS^T tile rows
  // dQ step: the 4 warps split the BM x D block into 16-row groups x column groups.
  static constexpr int kRowGroups = BM / 16;
  static constexpr int kColGroups = 4 / kRowGroups;
  static constexpr int kDC = D / kColGroups;  // dQ columns per warp
  static constexpr size_t kSmemBytes =
      sizeof(T) * static_cast<size_t>((2 * BN + 4 * BM) * kStride + BN * kStrideDS) +
      sizeof(float) * static_cast<size_t>(4 * BM);
  static_assert(kRowGroups * kColGroups == 4 && kDC % 16 == 0, "dQ warp split");
};

template <typename T, int D, int BM, bool CAUSAL>
__global__ void __launch_bounds__(128) attention_bwd_dkdv_kernel(const AttentionParams p) {
  using Tr = BwdTraits<T, D, BM>;
  constexpr int BN = Tr::BN;
  constexpr int kS = Tr::kStride;
  constexpr int kSD = Tr::kStrideDS;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kChunks = D / 8;

  T* sK = dynamic_smem<T>();    // [BN][kS]
  T* sV = sK + BN * kS;         // [BN][kS]
  T* sQ = sV + BN * kS;         // [2][BM][kS]
  T* sdO = sQ + 2 * BM * kS;    // [2][BM][kS]
  T* sdS = sdO + 2 * BM * kS;   // [BN][kSD]  dS^T of the current step, for dQ
  float* sLse = reinterpret_cast<float*>(sdS + BN * kSD);  // [2][BM]  L * log2(e)
  float* sDelta = sLse + 2 * BM;                            // [2][BM]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int tq = lane % 4;

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t hkv = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t group = p.Hq / p.Hkv;
  const int64_t offset = p.Tk - p.Tq;

  // Causal: query i sees key j iff j <= i + offset, so no query before n0 - offset sees this tile;
  // with a window also j > i + offset - window, so none from q_end on.
  const int64_t q_first = CAUSAL ? max64(0, n0 - offset) : 0;
  const int64_t q_end = window_query_end<CAUSAL>(p, n0, BN);
  const int64_t qt_begin = q_first / BM;
  const int64_t per_head = q_first < q_end ? ceil_div(q_end, BM) - qt_begin : 0;
  const int64_t n_iters = group * per_head;  // (query head, query tile) steps

  // K and V tiles: loaded once.
  {
    const T* kb = static_cast<const T*>(p.k) + b * p.k_stride.b + hkv * p.k_stride.h;
    const T* vb = static_cast<const T*>(p.v) + b * p.v_stride.b + hkv * p.v_stride.h;
    for (int c = tid; c < BN * kChunks; c += kThreads) {
      const int row = c / kChunks;
      const int ch = c % kChunks;
      const int64_t j = n0 + row;
      const bool valid = j < p.Tk;
      cp_async_16(sK + row * kS + ch * 8, valid ? kb + j * p.k_stride.t + ch * 8 : kb, valid);
      cp_async_16(sV + row * kS + ch * 8, valid ? vb + j * p.v_stride.t + ch * 8 : vb, valid);
    }
    cp_async_commit();
  }

  auto step_head = [&](int64_t it) { return hkv * group + it / per_head; };
  auto step_m0 = [&](int64_t it) { return (qt_begin + it % per_head) * BM; };
  auto load_q = [&](int64_t it, int stage) {
    const int64_t hq = step_head(it);
    const int64_t m0 = step_m0(it);
    const T* qb = static_cast<const T*>(p.q) + b * p.q_stride.b + hq * p.q_stride.h;
    const T* ob = static_cast<const T*>(p.dout) + b * p.dout_stride.b + hq * p.dout_stride.h;
    T* dq = sQ + stage * BM * kS;
    T* dob = sdO + stage * BM * kS;
    for (int c = tid; c < BM * kChunks; c += kThreads) {
      const int row = c / kChunks;
      const int ch = c % kChunks;
      const int64_t i = m0 + row;
      const bool valid = i < p.Tq;
      cp_async_16(dq + row * kS + ch * 8, valid ? qb + i * p.q_stride.t + ch * 8 : qb, valid);
      cp_async_16(dob + row * kS + ch * 8, valid ? ob + i * p.dout_stride.t + ch * 8 : ob, valid);
    }
    // Stage `stage` was last read in the step before the previous one, which ended in a barrier.
    for (int r = tid; r < BM; r += kThreads) {
      const int64_t i = m0 + r;
      const bool valid = i < p.Tq;
      const int64_t idx = (b * p.Hq + hq) * p.Tq + i;
      sLse[stage * BM + r] = valid ? p.lse[idx] * kLog2e : 0.f;
      sDelta[stage * BM + r] = valid ? p.delta[idx] : 0.f;
    }
  };
  if (n_iters > 0) load_q(0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const bool accumulate_dq = !p.deterministic;
  const bool alibi = p.alibi_slopes != nullptr;

  for (int64_t it = 0; it < n_iters; ++it) {
    const int stage = static_cast<int>(it & 1);
    if (it + 1 < n_iters) load_q(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // K/V and this step's Q/dO have landed
    __syncthreads();
    const int64_t hq = step_head(it);
    const int64_t m0 = step_m0(it);
    const T* cQ = sQ + stage * BM * kS;
    const T* cdO = sdO + stage * BM * kS;
    const float* cLse = sLse + stage * BM;
    const float* cDelta = sDelta + stage * BM;

    // S^T = K Q^T (16 keys x BM queries per warp): A = this warp's K rows, B[k = d][n = i] = Q[i][d].
    float st[BM / 8][4];
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, sK + lds_row_a(warp * 16, kk * 16, kS, lane));
#pragma unroll
      for (int qp = 0; qp < BM / 16; ++qp) {
        uint32_t bq[4];
        ldsm_x4(bq, cQ + lds_row_b(qp * 16, kk * 16, kS, lane));
        mma_16816<T>(st[2 * qp], a, bq[0], bq[1]);
        mma_16816<T>(st[2 * qp + 1], a, bq[2], bq[3]);
      }
    }

    // P^T = exp(s S^T + bias - L) (line 11); entries past Tq / Tk, above the causal diagonal or
    // outside the window are 0.
    const bool need_mask =
        m0 + BM > p.Tq || n0 + BN > p.Tk || (CAUSAL && n0 + BN - 1 > m0 + offset) ||
        (CAUSAL && p.window > 0 && n0 <= min64(m0 + BM, p.Tq) - 1 + offset - p.window);
    const float slope = alibi_slope_log2(p, hq);
    // j - i' of this thread's key row g and query column 2 tq (ALiBi).
    const float dist0 = static_cast<float>(n0 + warp * 16 + g - m0 - 2 * tq - offset);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = nt * 8 + 2 * tq + (e & 1);
        float x = st[nt][e] * scale_log2;
        if (alibi)
          x = fmaf(slope, dist0 + static_cast<float>(8 * (e >> 1) - nt * 8 - (e & 1)), x);
        float pv = exp2f(x - cLse[ql]);
        if (need_mask) {
          const int64_t i = m0 + ql;
          const int64_t j = n0 + warp * 16 + g + 8 * (e >> 1);
          if (i >= p.Tq || j >= p.Tk ||
              (CAUSAL && (j > i + offset || (p.window > 0 && j <= i + offset - p.window))))
            pv = 0.f;
        }
        st[nt][e] = pv;
      }
    }

    // dV += P^T dO (line 12): B[k = i][n = d] = dO[i][d] via ldmatrix.trans.
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq) {
      uint32_t a[4];
      c_to_a<T>(a, st[2 * kq], st[2 * kq + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bb[4];
        ldsm_x4_trans(bb, cdO + lds_row_a(kq * 16, dp * 16, kS, lane));
        mma_16816<T>(dv[2 * dp], a, bb[0], bb[1]);
        mma_16816<T>(dv[2 * dp + 1], a, bb[2], bb[3]);
      }
    }

    // dP^T = V dO^T (line 13): A = this warp's V rows, B[k = d][n = i] = dO[i][d].
    float dpt[BM / 8][4];
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, sV + lds_row_a(warp * 16, kk * 16, kS, lane));
#pragma unroll
      for (int qp = 0; qp < BM / 16; ++qp) {
        uint32_t bb[4];
        ldsm_x4(bb, cdO + lds_row_b(qp * 16, kk * 16, kS, lane));
        mma_16816<T>(dpt[2 * qp], a, bb[0], bb[1]);
        mma_16816<T>(dpt[2 * qp + 1], a, bb[2], bb[3]);
      }
    }

    // dS^T = P^T * (dP^T - D) (line 14), in place of dP^T.
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = nt * 8 + 2 * tq + (e & 1);
        dpt[nt][e] = st[nt][e] * (dpt[nt][e] - cDelta[ql]);
      }

    // dK += dS^T Q (line 16; the scale is applied once at the end): B[k = i][n = d] = Q[i][d].
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq) {
      uint32_t a[4];
      c_to_a<T>(a, dpt[2 * kq], dpt[2 * kq + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bb[4];
        ldsm_x4_trans(bb, cQ + lds_row_a(kq * 16, dp * 16, kS, lane));
        mma_16816<T>(dk[2 * dp], a, bb[0], bb[1]);
        mma_16816<T>(dk[2 * dp + 1], a, bb[2], bb[3]);
      }
    }

    // dQ += dS K (line 15) into the float32 accumulator. dS^T goes through shared memory so that
    // the warps can switch from key rows to query rows.
    if (accumulate_dq) {
#pragma unroll
      for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          store_b32(sdS + (warp * 16 + g + 8 * h) * kSD + nt * 8 + 2 * tq,
                    pack2<T>(dpt[nt][2 * h], dpt[nt][2 * h + 1]));
      __syncthreads();
      const int wr = warp % Tr::kRowGroups;  // query rows wr * 16 .. + 15 of the tile
      const int wc = warp / Tr::kRowGroups;  // columns wc * kDC .. + kDC - 1
      float dqa[Tr::kDC / 8][4];
#pragma unroll
      for (int nt = 0; nt < Tr::kDC / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dqa[nt][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < BN / 16; ++ks) {
        // A = dS (queries x keys) = transpose of the stored dS^T block.
        uint32_t a[4];
        ldsm_x4_trans(a, sdS + lds_row_b(ks * 16, wr * 16, kSD, lane));
#pragma unroll
        for (int dp = 0; dp < Tr::kDC / 16; ++dp) {
          uint32_t bb[4];
          ldsm_x4_trans(bb, sK + lds_row_a(ks * 16, wc * Tr::kDC + dp * 16, kS, lane));
          mma_16816<T>(dqa[2 * dp], a, bb[0], bb[1]);
          mma_16816<T>(dqa[2 * dp + 1], a, bb[2], bb[3]);
        }
      }
      float* acc = p.dq_accum + (b * p.Hq + hq) * p.Tq * p.D;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = m0 + wr * 16 + g + 8 * h;
        if (i >= p.Tq) continue;
#pragma unroll
        for (int nt = 0; nt < Tr::kDC / 8; ++nt) {
          const int64_t col = wc * Tr::kDC + nt * 8 + 2 * tq;
          atomicAdd(acc + i * p.D + col, dqa[nt][2 * h]);
          atomicAdd(acc + i * p.D + col + 1, dqa[nt][2 * h + 1]);
        }
      }
    }
    __syncthreads();  // this stage and sdS are free for the next step
  }
  cp_async_wait<0>();

  // Key rows no query can see keep dK = dV = 0.
  T* dkb = static_cast<T*>(p.dk) + b * p.dk_stride.b + hkv * p.dk_stride.h;
  T* dvb = static_cast<T*>(p.dv) + b * p.dv_stride.b + hkv * p.dv_stride.h;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t j = n0 + warp * 16 + g + 8 * h;
    if (j >= p.Tk) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + 2 * tq;
      store_b32(dkb + j * p.dk_stride.t + col,
                pack2<T>(dk[dt][2 * h] * p.scale, dk[dt][2 * h + 1] * p.scale));
      store_b32(dvb + j * p.dv_stride.t + col, pack2<T>(dv[dt][2 * h], dv[dt][2 * h + 1]));
    }
  }
}

// ----------------------------------------------------------------------------------------------
// bf16 / fp16 deterministic dQ: one CTA per (64 queries, query head, batch), key tiles in order.

template <typename T, int D, int BN>
struct BwdDqTraits {
  static constexpr int BM = 64;  // 4 warps x 16 query rows
  static constexpr int kThreads = 128;
  static constexpr int kStride = D + 8;
  static constexpr size_t kSmemBytes = sizeof(T) * static_cast<size_t>((2 * BM + 4 * BN) * kStride);
};

template <typename T, int D, int BN, bool CAUSAL>
__global__ void __launch_bounds__(128) attention_bwd_dq_kernel(const AttentionParams p) {
  using Tr = BwdDqTraits<T, D, BN>;
  constexpr int BM = Tr::BM;
  constexpr int kS = Tr::kStride;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kChunks = D / 8;

  T* sQ = dynamic_smem<T>();  // [BM][kS]
  T* sdO = sQ + BM * kS;      // [BM][kS]
  T* sK = sdO + BM * kS;      // [2][BN][kS]
  T* sV = sK + 2 * BN * kS;   // [2][BN][kS]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int tq = lane % 4;

  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * BM;
  const int64_t hq = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hkv = hq / (p.Hq / p.Hkv);
  const int64_t offset = p.Tk - p.Tq;
  const int64_t kv_end = CAUSAL ? min64(p.Tk, min64(m0 + BM, p.Tq) + offset) : p.Tk;
  const int n_tiles = kv_end > 0 ? static_cast<int>(ceil_div(kv_end, BN)) : 0;
  // The window: row m0 sees the earliest keys; earlier tiles are skipped, and tiles before the
  // last row's first key need the mask.
  const int n_begin = CAUSAL ? static_cast<int>(first_key(p, m0) / BN) : 0;
  const int64_t window_mask_below = CAUSAL ? first_key(p, min64(m0 + BM, p.Tq) - 1) : 0;

  {
    const T* qb = static_cast<const T*>(p.q) + b * p.q_stride.b + hq * p.q_stride.h;
    const T* ob = static_cast<const T*>(p.dout) + b * p.dout_stride.b + hq * p.dout_stride.h;
    for (int c = tid; c < BM * kChunks; c += kThreads) {
      const int row = c / kChunks;
      const int ch = c % kChunks;
      const int64_t i = m0 + row;
      const bool valid = i < p.Tq;
      cp_async_16(sQ + row * kS + ch * 8, valid ? qb + i * p.q_stride.t + ch * 8 : qb, valid);
      cp_async_16(sdO + row * kS + ch * 8, valid ? ob + i * p.dout_stride.t + ch * 8 : ob, valid);
    }
    cp_async_commit();
  }
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_stride.b + hkv * p.k_stride.h;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_stride.b + hkv * p.v_stride.h;
  auto load_kv = [&](int n, int stage) {
    T* dk = sK + stage * BN * kS;
    T* dv = sV + stage * BN * kS;
    for (int c = tid; c < BN * kChunks; c += kThreads) {
      const int row = c / kChunks;
      const int ch = c % kChunks;
      const int64_t j = static_cast<int64_t>(n) * BN + row;
      const bool valid = j < p.Tk;
      cp_async_16(dk + row * kS + ch * 8, valid ? kbase + j * p.k_stride.t + ch * 8 : kbase, valid);
      cp_async_16(dv + row * kS + ch * 8, valid ? vbase + j * p.v_stride.t + ch * 8 : vbase, valid);
    }
  };
  if (n_begin < n_tiles) load_kv(n_begin, 0);
  cp_async_commit();

  cp_async_wait<1>();  // Q and dO have landed
  __syncthreads();
  uint32_t qf[D / 16][4], df[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldsm_x4(qf[kk], sQ + lds_row_a(warp * 16, kk * 16, kS, lane));
    ldsm_x4(df[kk], sdO + lds_row_a(warp * 16, kk * 16, kS, lane));
  }

  // Rows past Tq are computed on zeros and never stored; their L and D only need to be finite.
  int64_t row_i[2], first_vis[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_i[h] = m0 + warp * 16 + g + 8 * h;
    first_vis[h] = CAUSAL ? first_key(p, row_i[h]) : 0;
    const bool valid = row_i[h] < p.Tq;
    const int64_t idx = (b * p.Hq + hq) * p.Tq + row_i[h];
    lse2[h] = valid ? p.lse[idx] * kLog2e : 0.f;
    delta[h] = valid ? p.delta[idx] : 0.f;
  }
  const bool alibi = p.alibi_slopes != nullptr;
  const float slope = alibi_slope_log2(p, hq);

  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
  const float scale_log2 = p.scale * kLog2e;

  for (int n = n_begin; n < n_tiles; ++n) {
    const int stage = (n - n_begin) & 1;
    if (n + 1 < n_tiles) load_kv(n + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* cK = sK + stage * BN * kS;
    const T* cV = sV + stage * BN * kS;

    // S = Q K^T and dP = dO V^T (lines 11, 13): B[k = d][n = j] = K[j][d] (resp. V[j][d]).
    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t kb[4], vb[4];
        ldsm_x4(kb, cK + lds_row_b(np * 16, kk * 16, kS, lane));
        mma_16816<T>(s[2 * np], qf[kk], kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
        ldsm_x4(vb, cV + lds_row_b(np * 16, kk * 16, kS, lane));
        mma_16816<T>(dp[2 * np], df[kk], vb[0], vb[1]);
        mma_16816<T>(dp[2 * np + 1], df[kk], vb[2], vb[3]);
      }
    }

    // dS = P * (dP - D) (line 14), in place of S.
    const int64_t n0 = static_cast<int64_t>(n) * BN;
    const bool need_mask = n0 + BN > p.Tk || (CAUSAL && n0 + BN - 1 > m0 + offset) ||
                           n0 < window_mask_below;
    // j - i' of column 2 tq of this tile for each of the two rows (ALiBi).
    const float dist0[2] = {static_cast<float>(n0 + 2 * tq - row_i[0] - offset),
                            static_cast<float>(n0 + 2 * tq - row_i[1] - offset)};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale_log2;
        if (alibi) x = fmaf(slope, dist0[e >> 1] + static_cast<float>(nt * 8 + (e & 1)), x);
        float pv = exp2f(x - lse2[e >> 1]);
        if (need_mask) {
          const int64_t j = n0 + nt * 8 + 2 * tq + (e & 1);
          if (j >= p.Tk || (CAUSAL && (j > row_i[e >> 1] + offset || j < first_vis[e >> 1])))
            pv = 0.f;
        }
        s[nt][e] = pv * (dp[nt][e] - delta[e >> 1]);
      }
    }

    // dQ += dS K (line 15): dS from registers as A; B[k = j][n = d] = K[j][d] via .trans.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp2 = 0; dp2 < D / 16; ++dp2) {
        uint32_t kb[4];
        ldsm_x4_trans(kb, cK + lds_row_a(kk * 16, dp2 * 16, kS, lane));
        mma_16816<T>(dq[2 * dp2], a, kb[0], kb[1]);
        mma_16816<T>(dq[2 * dp2 + 1], a, kb[2], kb[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  T* dqb = static_cast<T*>(p.dq) + b * p.dq_stride.b + hq * p.dq_stride.h;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (row_i[h] >= p.Tq) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      store_b32(dqb + row_i[h] * p.dq_stride.t + dt * 8 + 2 * tq,
                pack2<T>(dq[dt][2 * h] * p.scale, dq[dt][2 * h + 1] * p.scale));
  }
}

// ----------------------------------------------------------------------------------------------
// float32 CUDA-core backward: dK/dV (+ atomic dQ) and deterministic dQ.

template <int D>
struct BwdF32Traits {
  static constexpr int BN = 16;  // keys per CTA (dK/dV kernel): 4 per warp
  static constexpr int BM = 32;  // queries per step, one per lane
  static constexpr int kThreads = 128;
  static constexpr int kS = D + 1;
  static constexpr int kP = BM + 1;
  static constexpr size_t kSmemBytes =
      sizeof(float) * static_cast<size_t>((2 * BN + 2 * BM) * kS + 2 * BM + 2 * BN * kP);
};

template <int D, bool CAUSAL>
__global__ void __launch_bounds__(128) attention_bwd_dkdv_f32_kernel(const AttentionParams p) {
  using Tr = BwdF32Traits<D>;
  constexpr int BN = Tr::BN, BM = Tr::BM, kS = Tr::kS, kP = Tr::kP, kThreads = Tr::kThreads;

  float* sK = dynamic_smem<float>();  // [BN][kS]
  float* sV = sK + BN * kS;           // [BN][kS]
  float* sQ = sV + BN * kS;           // [BM][kS]
  float* sdO = sQ + BM * kS;          // [BM][kS]
  float* sLse = sdO + BM * kS;        // [BM]
  float* sDelta = sLse + BM;          // [BM]
  float* sP = sDelta + BM;            // [BN][kP]  P^T
  float* sdS = sP + BN * kP;          // [BN][kP]  dS^T

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t hkv = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t group = p.Hq / p.Hkv;
  const int64_t offset = p.Tk - p.Tq;
  const int64_t q_first = CAUSAL ? max64(0, n0 - offset) : 0;
  const int64_t q_end = window_query_end<CAUSAL>(p, n0, BN);
  const int64_t qt_begin = q_first / BM;
  const int64_t per_head = q_first < q_end ? ceil_div(q_end, BM) - qt_begin : 0;
  const int64_t n_iters = group * per_head;

  const float* kb = static_cast<const float*>(p.k) + b * p.k_stride.b + hkv * p.k_stride.h;
  const float* vb = static_cast<const float*>(p.v) + b * p.v_stride.b + hkv * p.v_stride.h;
  for (int c = tid; c < BN * D; c += kThreads) {
    const int row = c / D;
    const int d = c % D;
    const int64_t j = n0 + row;
    const bool valid = j < p.Tk;
    sK[row * kS + d] = valid ? kb[j * p.k_stride.t + d] : 0.f;
    sV[row * kS + d] = valid ? vb[j * p.v_stride.t + d] : 0.f;
  }

  // Thread owns key row tid / 8, columns tid % 8 + 8 c of dK and dV.
  const int krow = tid / 8;
  const int kcol = tid % 8;
  float dk[D / 8], dv[D / 8];
#pragma unroll
  for (int c = 0; c < D / 8; ++c) dk[c] = dv[c] = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const bool alibi = p.alibi_slopes != nullptr;

  for (int64_t it = 0; it < n_iters; ++it) {
    const int64_t hq = hkv * group + it / per_head;
    const int64_t m0 = (qt_begin + it % per_head) * BM;
    const float* qb = static_cast<const float*>(p.q) + b * p.q_stride.b + hq * p.q_stride.h;
    const float* ob =
        static_cast<const float*>(p.dout) + b * p.dout_stride.b + hq * p.dout_stride.h;
    __syncthreads();  // K/V are stored / the previous step's readers are done
    for (int c = tid; c < BM * D; c += kThreads) {
      const int row = c / D;
      const int d = c % D;
      const int64_t i = m0 + row;
      const bool valid = i < p.Tq;
      sQ[row * kS + d] = valid ? qb[i * p.q_stride.t + d] : 0.f;
      sdO[row * kS + d] = valid ? ob[i * p.dout_stride.t + d] : 0.f;
    }
    for (int r = tid; r < BM; r += kThreads) {
      const int64_t i = m0 + r;
      const bool valid = i < p.Tq;
      const int64_t idx = (b * p.Hq + hq) * p.Tq + i;
      sLse[r] = valid ? p.lse[idx] * kLog2e : 0.f;
      sDelta[r] = valid ? p.delta[idx] : 0.f;
    }
    __syncthreads();

    // Warp w: keys w, w + 4, w + 8, w + 12; lane: query m0 + lane.
    const int64_t i = m0 + lane;
    const float slope = alibi_slope_log2(p, hq);
#pragma unroll
    for (int kr = 0; kr < 4; ++kr) {
      const int kl = warp + 4 * kr;
      const int64_t j = n0 + kl;
      float sv = 0.f, dpv = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        sv += sK[kl * kS + d] * sQ[lane * kS + d];
        dpv += sV[kl * kS + d] * sdO[lane * kS + d];
      }
      float x = sv * scale_log2;
      if (alibi) x = fmaf(slope, static_cast<float>(j - i - offset), x);
      float pv = exp2f(x - sLse[lane]);
      if (i >= p.Tq || j >= p.Tk ||
          (CAUSAL && (j > i + offset || (p.window > 0 && j <= i + offset - p.window))))
        pv = 0.f;
      sP[kl * kP + lane] = pv;
      sdS[kl * kP + lane] = pv * (dpv - sDelta[lane]);
    }
    __syncthreads();

#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
      const int col = kcol + 8 * c;
      float av = dv[c], ak = dk[c];
      for (int q = 0; q < BM; ++q) {
        av += sP[krow * kP + q] * sdO[q * kS + col];
        ak += sdS[krow * kP + q] * sQ[q * kS + col];
      }
      dv[c] = av;
      dk[c] = ak;
    }

    if (!p.deterministic) {
      // Thread: query tid / 4, columns tid % 4 + 4 c.
      const int qr = tid / 4;
      const int64_t iq = m0 + qr;
      if (iq < p.Tq) {
        float* acc = p.dq_accum + ((b * p.Hq + hq) * p.Tq + iq) * p.D;
        for (int c = tid % 4; c < D; c += 4) {
          float x = 0.f;
#pragma unroll
          for (int kl = 0; kl < BN; ++kl) x += sdS[kl * kP + qr] * sK[kl * kS + c];
          atomicAdd(acc + c, x);
        }
      }
    }
  }

  const int64_t j = n0 + krow;
  if (j < p.Tk) {
    float* dkp = static_cast<float*>(p.dk) + b * p.dk_stride.b + hkv * p.dk_stride.h +
                 j * p.dk_stride.t;
    float* dvp = static_cast<float*>(p.dv) + b * p.dv_stride.b + hkv * p.dv_stride.h +
                 j * p.dv_stride.t;
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
      dkp[kcol + 8 * c] = dk[c] * p.scale;
      dvp[kcol + 8 * c] = dv[c];
    }
  }
}

template <int D>
struct BwdDqF32Traits {
  static constexpr int BM = 16;  // queries per CTA: 4 per warp
  static constexpr int BN = 32;  // keys per step, one per lane
  static constexpr int kThreads = 128;
  static constexpr int kS = D + 1;
  static constexpr int kP = BN + 1;
  static constexpr size_t kSmemBytes =
      sizeof(float) * static_cast<size_t>((2 * BM + 2 * BN) * kS + BM * kP);
};

template <int D, bool CAUSAL>
__global__ void __launch_bounds__(128) attention_bwd_dq_f32_kernel(const AttentionParams p) {
  using Tr = BwdDqF32Traits<D>;
  constexpr int BM = Tr::BM, BN = Tr::BN, kS = Tr::kS, kP = Tr::kP, kThreads = Tr::kThreads;

  float* sQ = dynamic_smem<float>();  // [BM][kS]
  float* sdO = sQ + BM * kS;          // [BM][kS]
  float* sK = sdO + BM * kS;          // [BN][kS]
  float* sV = sK + BN * kS;           // [BN][kS]
  float* sdS = sV + BN * kS;          // [BM][kP]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * BM;
  const int64_t hq = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hkv = hq / (p.Hq / p.Hkv);
  const int64_t offset = p.Tk - p.Tq;
  const int64_t kv_end = CAUSAL ? min64(p.Tk, min64(m0 + BM, p.Tq) + offset) : p.Tk;
  const int n_tiles = kv_end > 0 ? static_cast<int>(ceil_div(kv_end, BN)) : 0;
  const int n_begin = CAUSAL ? static_cast<int>(first_key(p, m0) / BN) : 0;  // the window

  const float* qb = static_cast<const float*>(p.q) + b * p.q_stride.b + hq * p.q_stride.h;
  const float* ob = static_cast<const float*>(p.dout) + b * p.dout_stride.b + hq * p.dout_stride.h;
  for (int c = tid; c < BM * D; c += kThreads) {
    const int row = c / D;
    const int d = c % D;
    const int64_t i = m0 + row;
    const bool valid = i < p.Tq;
    sQ[row * kS + d] = valid ? qb[i * p.q_stride.t + d] : 0.f;
    sdO[row * kS + d] = valid ? ob[i * p.dout_stride.t + d] : 0.f;
  }
  // Warp w owns rows w, w + 4, w + 8, w + 12 for the scores.
  float lse2[4], delta[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t i = m0 + warp + 4 * k;
    const bool valid = i < p.Tq;
    const int64_t idx = (b * p.Hq + hq) * p.Tq + i;
    lse2[k] = valid ? p.lse[idx] * kLog2e : 0.f;
    delta[k] = valid ? p.delta[idx] : 0.f;
  }
  // Thread owns output row tid / 8, columns tid % 8 + 8 c.
  const int orow = tid / 8;
  const int ocol = tid % 8;
  float dq[D / 8];
#pragma unroll
  for (int c = 0; c < D / 8; ++c) dq[c] = 0.f;

  const float* kb = static_cast<const float*>(p.k) + b * p.k_stride.b + hkv * p.k_stride.h;
  const float* vb = static_cast<const float*>(p.v) + b * p.v_stride.b + hkv * p.v_stride.h;
  const float scale_log2 = p.scale * kLog2e;
  const bool alibi = p.alibi_slopes != nullptr;
  const float slope = alibi_slope_log2(p, hq);

  for (int n = n_begin; n < n_tiles; ++n) {
    const int64_t n0 = static_cast<int64_t>(n) * BN;
    __syncthreads();
    for (int c = tid; c < BN * D; c += kThreads) {
      const int row = c / D;
      const int d = c % D;
      const int64_t j = n0 + row;
      const bool valid = j < p.Tk;
      sK[row * kS + d] = valid ? kb[j * p.k_stride.t + d] : 0.f;
      sV[row * kS + d] = valid ? vb[j * p.v_stride.t + d] : 0.f;
    }
    __syncthreads();

    const int64_t j = n0 + lane;
#pragma unroll
    for (int kr = 0; kr < 4; ++kr) {
      const int row = warp + 4 * kr;
      const int64_t i = m0 + row;
      float sv = 0.f, dpv = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        sv += sQ[row * kS + d] * sK[lane * kS + d];
        dpv += sdO[row * kS + d] * sV[lane * kS + d];
      }
      float x = sv * scale_log2;
      if (alibi) x = fmaf(slope, static_cast<float>(j - i - offset), x);
      float pv = exp2f(x - lse2[kr]);
      if (i >= p.Tq || j >= p.Tk ||
          (CAUSAL && (j > i + offset || (p.window > 0 && j <= i + offset - p.window))))
        pv = 0.f;
      sdS[row * kP + lane] = pv * (dpv - delta[kr]);
    }
    __syncthreads();

#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
      float acc = dq[c];
      for (int jj = 0; jj < BN; ++jj) acc += sdS[orow * kP + jj] * sK[jj * kS + ocol + 8 * c];
      dq[c] = acc;
    }
  }

  const int64_t i = m0 + orow;
  if (i < p.Tq) {
    float* dst = static_cast<float*>(p.dq) + b * p.dq_stride.b + hq * p.dq_stride.h +
                 i * p.dq_stride.t;
#pragma unroll
    for (int c = 0; c < D / 8; ++c) dst[ocol + 8 * c] = dq[c] * p.scale;
  }
}

// ----------------------------------------------------------------------------------------------
// Launchers.

// Grid-stride kernels: enough blocks to fill the GPU, never more than the work.
inline unsigned stride_grid(int64_t work_items, int64_t per_block) {
  return static_cast<unsigned>(max64(1, min64(ceil_div(work_items, per_block), 65536)));
}

template <typename T>
int launch_delta(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.Hq * p.Tq;
  if (rows == 0) return kSuccess;
  return launch(attention_bwd_delta_kernel<T>, dim3(stride_grid(rows, 8)), dim3(256), 0, stream, p);
}

template <typename T>
int launch_dq_convert(const AttentionParams& p, cudaStream_t stream) {
  const int64_t total = p.B * p.Hq * p.Tq * p.D;
  if (total == 0) return kSuccess;
  return launch(attention_bwd_dq_convert_kernel<T>, dim3(stride_grid(total, 256)), dim3(256), 0,
                stream, p);
}

template <typename Kernel>
int launch_tiles(Kernel kernel, int64_t tiles, int64_t heads, size_t smem,
                 const AttentionParams& p, cudaStream_t stream) {
  if (tiles == 0) return kSuccess;
  if (tiles > 0x7fffffff || heads > 65535) return kErrGrid;
  if (int err = prepare_smem(kernel, smem)) return err;
  return launch(kernel, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(heads),
                             static_cast<unsigned>(p.B)),
                dim3(128), smem, stream, p);
}

template <typename T, int D, bool CAUSAL>
int run_bwd_half(const AttentionParams& p, cudaStream_t stream) {
  if (int err = require_sm80()) return err;
  const int64_t eb = sizeof(T);
  if (!rows_aligned(p.q, p.q_stride, p.B, p.Hq, p.Tq, eb, 16) ||
      !rows_aligned(p.k, p.k_stride, p.B, p.Hkv, p.Tk, eb, 16) ||
      !rows_aligned(p.v, p.v_stride, p.B, p.Hkv, p.Tk, eb, 16) ||
      !rows_aligned(p.dout, p.dout_stride, p.B, p.Hq, p.Tq, eb, 16) ||
      !rows_aligned(p.dq, p.dq_stride, p.B, p.Hq, p.Tq, eb, 4) ||
      !rows_aligned(p.dk, p.dk_stride, p.B, p.Hkv, p.Tk, eb, 4) ||
      !rows_aligned(p.dv, p.dv_stride, p.B, p.Hkv, p.Tk, eb, 4))
    return kErrAlignment;

  if (int err = launch_delta<T>(p, stream)) return err;
  // BM query rows per step: 64 for small heads, 32 for large ones (dK, dV stay in registers).
  constexpr int BM = D <= 64 ? 64 : 32;
  using Tr = BwdTraits<T, D, BM>;
  if (int err = launch_tiles(attention_bwd_dkdv_kernel<T, D, BM, CAUSAL>, ceil_div(p.Tk, Tr::BN),
                             p.Hkv, Tr::kSmemBytes, p, stream))
    return err;
  if (!p.deterministic) return launch_dq_convert<T>(p, stream);
  constexpr int BN = D <= 64 ? 64 : 32;
  using TrQ = BwdDqTraits<T, D, BN>;
  return launch_tiles(attention_bwd_dq_kernel<T, D, BN, CAUSAL>, ceil_div(p.Tq, TrQ::BM), p.Hq,
                      TrQ::kSmemBytes, p, stream);
}

template <int D, bool CAUSAL>
int run_bwd_f32(const AttentionParams& p, cudaStream_t stream) {
  if (int err = launch_delta<float>(p, stream)) return err;
  using Tr = BwdF32Traits<D>;
  if (int err = launch_tiles(attention_bwd_dkdv_f32_kernel<D, CAUSAL>, ceil_div(p.Tk, Tr::BN),
                             p.Hkv, Tr::kSmemBytes, p, stream))
    return err;
  if (!p.deterministic) return launch_dq_convert<float>(p, stream);
  using TrQ = BwdDqF32Traits<D>;
  return launch_tiles(attention_bwd_dq_f32_kernel<D, CAUSAL>, ceil_div(p.Tq, TrQ::BM), p.Hq,
                      TrQ::kSmemBytes, p, stream);
}

}  // namespace
}  // namespace v1
}  // namespace gpu

int v1::attention_backward_cuda(const AttentionParams& p, void* stream_ptr) {
  using namespace gpu;
  using namespace gpu::v1;
  if (int err = check_sizes(p)) return err;
  if (p.B == 0 || p.Hq == 0) return kSuccess;  // empty gradients
  // Empty tensors may have null data; everything else must be there.
  const bool has_q = p.Tq > 0, has_k = p.Tk > 0;
  if ((has_q && (p.q == nullptr || p.out == nullptr || p.dout == nullptr || p.lse == nullptr ||
                 p.delta == nullptr || p.dq == nullptr ||
                 (!p.deterministic && p.dq_accum == nullptr))) ||
      (has_k && (p.k == nullptr || p.v == nullptr || p.dk == nullptr || p.dv == nullptr)))
    return kErrNullPointer;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.dtype == DType::Float32) {
    return MINIGPT_HEADDIM_SWITCH(p.D, kD, [&] {
      return MINIGPT_BOOL_SWITCH(p.causal, kCausal, [&] { return run_bwd_f32<kD, kCausal>(p, stream); });
    });
  }
  return MINIGPT_HALF_SWITCH(p.dtype, T, [&] {
    return MINIGPT_HEADDIM_SWITCH(p.D, kD, [&] {
      return MINIGPT_BOOL_SWITCH(p.causal, kCausal,
                                 [&] { return run_bwd_half<T, kD, kCausal>(p, stream); });
    });
  });
}

}  // namespace minigpt
