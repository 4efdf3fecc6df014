// minigpt attention on CUDA: the bf16/fp16 deterministic dQ kernel of the backward (tensor cores).
// Included once by attention_bwd.cu, inside its anonymous namespace (it is part of that
// translation unit: the launchers there instantiate these kernels).
#pragma once

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
  const int64_t hkv = static_cast<int>(hq) / (static_cast<int>(p.Hq) / static_cast<int>(p.Hkv));
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
