// minigpt attention on CUDA: the bf16/fp16 dK/dV kernel of the backward (tensor cores), in
// FlashAttention-2's layout (flash_bwd_kernel.h, compute_dq_dk_dv_1colblock; tile shapes from
// flash_bwd_launch_template.h). Included once by attention_bwd.cu, inside its anonymous namespace
// (it is part of that translation unit: the launchers there instantiate these kernels).
//
// One CTA owns BN keys of one kv head and keeps their dK and dV in registers; it
// steps over the query tiles (BM rows) of every query head of the GQA group that can see them.
// Per step (FA2 Alg. 2, lines 11-16), with three warp grids over the same CTA:
//   S = Q K^T, dP = dO V^T    (BM x BN)  WM warps along the queries x the rest along the keys;
//                                        each computed once; P = exp(S - L) and
//                                        dS = P * (dP - D) go to shared memory as bf16/fp16
//   dV += P^T dO, dK += dS^T Q (BN x D)  KV_WN warps along the keys x the rest along D; the
//                                        transposed operands come from the same shared tiles
//                                        through ldmatrix.trans
//   dQ += dS K                 (BM x D)  DQ_WM warps along the queries x the rest along D;
//                                        float atomics straight from the accumulators (float2
//                                        on sm_90), unless deterministic
// Every warp's block spans two or more m16 tiles where registers allow, so each K, V, Q or dO
// fragment an ldmatrix loads feeds several MMAs.
#pragma once

// ----------------------------------------------------------------------------------------------
// Tile shapes. LARGE (FA2's choice for GPUs with >= 144 KB of shared memory per block; it fits
// the 163 KB of an A100 and the 227 KB of an H100): 8 warps, 128 keys per CTA, 128 query rows per
// step for D <= 64 and 64 above. Otherwise (GPUs with 99 KB: sm_86, sm_89) 4 warps, 64
// keys, 64 query rows (32 for D = 128). dO is double-buffered where the tiles leave room within
// the A100's 163 KB, else single (FA2's kSmemQdOSize: Q double, dO single), at the price of a
// third barrier per step. Registers (ptxas, sm_80 and sm_90a, torch's flags): at most 255 with no
// spill for every variant; the chunking below is what keeps them there.

template <typename T, int D, bool LARGE>
struct BwdTraits {
  static constexpr int kWarps = LARGE ? 8 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kD = D;
  static constexpr int BN = LARGE ? 128 : 64;                                 // keys per CTA
  static constexpr int BM = LARGE ? (D <= 64 ? 128 : 64) : (D <= 96 ? 64 : 32);  // queries/step
  // Warp grids (FA2's AtomLayoutMSdP, AtomLayoutNdKV, AtomLayoutMdQ).
  static constexpr int WM = LARGE && D <= 64 ? 4 : 2;
  static constexpr int KV_WN = LARGE ? 4 : 2;
  static constexpr int DQ_WM = LARGE && D < 128 ? 4 : 2;
  // Each warp's block: S/dP rows x keys; dK/dV keys x cols; dQ rows x cols.
  static constexpr int kSRows = BM / WM, kSKeys = BN / (kWarps / WM);
  static constexpr int kKVKeys = BN / KV_WN, kKVCols = D / (kWarps / KV_WN);
  static constexpr int kQRows = BM / DQ_WM, kQCols = D / (kWarps / DQ_WM);
  // S and dP of a warp's block are computed kSChunk keys at a time (scores_chunk) where dK, dV,
  // S and dP of whole blocks would need more than 255 registers (ptxas spills: large tiles at
  // D = 64 and 128; small tiles at D = 96 reach 255); each chunk reloads the Q and dO fragments.
  static constexpr int kSChunk =
      (LARGE && D == 128) || (!LARGE && D == 96) ? 16 : LARGE && D == 64 ? 32 : kSKeys;
  static_assert(kSRows % 16 == 0 && kSKeys % 16 == 0 && kKVKeys % 16 == 0 &&
                    kKVCols % 16 == 0 && kQRows % 16 == 0 && kQCols % 16 == 0,
                "warp blocks are whole 16 x 16 ldmatrix blocks");
  // Shared rows padded by 16 bytes: the 8 row addresses of one ldmatrix land on distinct banks.
  static constexpr int kStride = D + 8;    // K, V, Q, dO: [rows][D]
  static constexpr int kStrideP = BN + 8;  // P, dS: [BM][BN]
  static constexpr size_t smem_bytes(int do_stages) {
    return sizeof(T) * static_cast<size_t>((2 * BN + (2 + do_stages) * BM) * kStride +
                                           2 * BM * kStrideP);
  }
  static constexpr size_t kSmemA100 = 163 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  static constexpr int kDOStages = smem_bytes(2) <= kSmemA100 ? 2 : 1;
  static constexpr size_t kSmemBytes = smem_bytes(kDOStages);
  static_assert(kSmemBytes <= (LARGE ? kSmemA100 : 99 * 1024), "shared memory of the tiles");
};

// ----------------------------------------------------------------------------------------------
// Building blocks.

// cp.async of rows row0 .. row0 + ROWS - 1 (of n_rows) into a [ROWS][D + 8] shared tile; rows
// past n_rows are zero-filled.
template <int ROWS, int D, int kThreads, typename T>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t row_stride, int row0,
                                          int n_rows, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(ROWS * kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int k = 0; k < ROWS * kChunks / kThreads; ++k) {
    const int c = tid + k * kThreads;
    const int row = c / kChunks, ch = c % kChunks;
    const bool valid = row0 + row < n_rows;
    const int64_t r = valid ? row0 + row : 0;
    cp_async_16(dst + row * (D + 8) + ch * 8, src + r * row_stride + ch * 8, valid);
  }
}

// acc[MT][NT] += A B for one warp's (16 MT) x (8 NT) block, k = 0 .. K - 1, both operands from
// row-major shared tiles (see common.cuh for the ldmatrix patterns):
//   A[m][k] = X[m0 + m][k] (ldmatrix of lds_row_a), or with A_T = X[k][m0 + m] (.trans of
//             lds_row_b: the A fragment of the transposed block);
//   B[k][n] = Y[n0 + n][k] (ldmatrix of lds_row_b), or with B_T = Y[k][n0 + n] (.trans of
//             lds_row_a).
// Each A fragment feeds NT MMAs, each ldmatrix of B (two n8 tiles) 2 MT.
template <typename T, int MT, int NT, int K, bool A_T, bool B_T>
__device__ __forceinline__ void warp_mma(float (&acc)[MT][NT][4], const T* sX, int x_stride,
                                         int m0, const T* sY, int y_stride, int n0, int lane) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "warp block");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (A_T) ldsm_x4_trans(a[mt], sX + lds_row_b(kk * 16, m0 + 16 * mt, x_stride, lane));
      else ldsm_x4(a[mt], sX + lds_row_a(m0 + 16 * mt, kk * 16, x_stride, lane));
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      if constexpr (B_T) ldsm_x4_trans(b, sY + lds_row_a(kk * 16, n0 + 16 * np, y_stride, lane));
      else ldsm_x4(b, sY + lds_row_b(n0 + 16 * np, kk * 16, y_stride, lane));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// A warp's C fragments into a row-major [.][stride] shared tile at (row0, col0), as T pairs.
template <typename T, int MT, int NT>
__device__ __forceinline__ void store_c(T* dst, int stride, int row0, int col0,
                                        const float (&c)[MT][NT][4], int lane) {
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        store_b32(dst + (row0 + 16 * mt + g + 8 * h) * stride + col0 + nt * 8 + 2 * tq,
                  pack2<T>(c[mt][nt][2 * h], c[mt][nt][2 * h + 1]));
}

// The per-CTA constants of the dK/dV kernel (32-bit sizes: the host checked fits_int32_indices).
struct DkdvCta {
  int Tq, Tk, offset, window, group;
  int n0;                   // first key of the CTA
  int qt_begin, per_head;   // query tiles qt_begin .. qt_begin + per_head - 1 of each head
  int64_t hkv, b;
  float scale_log2;
};

// One query tile of a head of the group: the step's place in the loop over (head, tile).
struct DkdvStep {
  int head;  // in the group
  int tile;  // query tile, qt_begin ...
};

// The shared tiles: K, V [BN][D + 8]; Q [2][BM][D + 8]; dO [kDOStages][BM][D + 8]; P, dS
// [BM][BN + 8].
template <typename Tr, typename T>
struct DkdvSmem {
  T* k;
  T* v;
  T* q;
  T* dout;
  T* p;
  T* ds;
  __device__ explicit DkdvSmem(T* base)
      : k(base),
        v(k + Tr::BN * Tr::kStride),
        q(v + Tr::BN * Tr::kStride),
        dout(q + 2 * Tr::BM * Tr::kStride),
        p(dout + Tr::kDOStages * Tr::BM * Tr::kStride),
        ds(p + Tr::BM * Tr::kStrideP) {}
};

// Query tile st of tensor src (q or dout) into dst.
template <typename Tr, typename T>
__device__ __forceinline__ void load_query_tile(T* dst, const void* src, const Strides4& s,
                                                const DkdvCta& c, DkdvStep st, int tid) {
  const int64_t hq = c.hkv * c.group + st.head;
  load_rows<Tr::BM, Tr::kD, Tr::kThreads>(dst, static_cast<const T*>(src) + c.b * s.b + hq * s.h,
                                          s.t, st.tile * Tr::BM, c.Tq, tid);
}

// S and dP of one chunk of a warp's block (rows s_row0 + 16 SMT, keys key0 .. + kSChunk - 1), then
// P and dS into shared memory (Alg. 2 lines 11, 13, 14). A warp's block runs in chunks to bound
// the registers that S and dP hold next to dK and dV.
template <typename Tr, bool CAUSAL, bool ALIBI, bool WINDOW, bool MASK, typename T, int NR>
__device__ __forceinline__ void scores_chunk(const DkdvCta& c, const DkdvSmem<Tr, T>& sm,
                                             const T* sQ, const T* sdO, int m0, int s_row0,
                                             int key0, const float (&lse2)[NR],
                                             const float (&delta)[NR], float slope) {
  constexpr int kS = Tr::kStride, SMT = NR / 2, NT = Tr::kSChunk / 8;
  const int lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  // S = Q K^T, then P = exp(s S + bias - L) (line 11) in place; entries past Tq / Tk, above the
  // causal diagonal or outside the window are 0.
  float s[SMT][NT][4];
  zero(s);
  warp_mma<T, SMT, NT, Tr::kD, false, false>(s, sQ, kS, s_row0, sm.k, kS, key0, lane);
  // ALiBi: j - i' of this thread's element (row g, key 2 tq), then of each element exactly.
  [[maybe_unused]] const float dist0 =
      static_cast<float>(c.n0 + key0 + 2 * tq - (m0 + s_row0 + g) - c.offset);
#pragma unroll
  for (int mt = 0; mt < SMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        // scale * S * log2(e) - L * log2(e) as one FFMA (and one more for ALiBi's bias)
        float x = fmaf(s[mt][nt][e], c.scale_log2, -lse2[2 * mt + (e >> 1)]);
        if constexpr (ALIBI)
          x = fmaf(slope, dist0 + static_cast<float>(nt * 8 + (e & 1) - 16 * mt - 8 * (e >> 1)), x);
        float pv = exp2f(x);
        if constexpr (MASK) {
          const int i = m0 + s_row0 + 16 * mt + g + 8 * (e >> 1);
          const int j = c.n0 + key0 + nt * 8 + 2 * tq + (e & 1);
          if (i >= c.Tq || j >= c.Tk || (CAUSAL && j > i + c.offset) ||
              (WINDOW && j <= i + c.offset - c.window))
            pv = 0.f;
        }
        s[mt][nt][e] = pv;
      }
  store_c<T>(sm.p, Tr::kStrideP, s_row0, key0, s, lane);

  // dP = dO V^T (line 13), then dS = P * (dP - D) (line 14) in place.
  float dp[SMT][NT][4];
  zero(dp);
  warp_mma<T, SMT, NT, Tr::kD, false, false>(dp, sdO, kS, s_row0, sm.v, kS, key0, lane);
#pragma unroll
  for (int mt = 0; mt < SMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        dp[mt][nt][e] = s[mt][nt][e] * (dp[mt][nt][e] - delta[2 * mt + (e >> 1)]);
  store_c<T>(sm.ds, Tr::kStrideP, s_row0, key0, dp, lane);
}

// ----------------------------------------------------------------------------------------------
// One step: query tile st of the group's head st.head against the CTA's keys (Alg. 2 lines
// 11-16). `stage` is this step's Q (and dO) buffer; the next step's tiles are prefetched.
template <typename Tr, bool CAUSAL, bool ALIBI, bool WINDOW, bool MASK, typename T, int KMT, int KNT>
__device__ __forceinline__ void dkdv_step(const AttentionParams& p, const DkdvCta& c,
                                          const DkdvSmem<Tr, T>& sm, DkdvStep st, int stage,
                                          bool has_next, DkdvStep next, float (&dk)[KMT][KNT][4],
                                          float (&dv)[KMT][KNT][4]) {
  constexpr int BM = Tr::BM, kS = Tr::kStride, kSP = Tr::kStrideP;
  constexpr int SMT = Tr::kSRows / 16;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;

  cp_async_wait<0>();
  __syncthreads();  // this step's Q and dO have landed; every warp is done with the last step
  if (has_next) {
    load_query_tile<Tr, T>(sm.q + (stage ^ 1) * BM * kS, p.q, p.q_stride, c, next, tid);
    if constexpr (Tr::kDOStages == 2)
      load_query_tile<Tr, T>(sm.dout + (stage ^ 1) * BM * kS, p.dout, p.dout_stride, c, next, tid);
  }
  cp_async_commit();
  const T* sQ = sm.q + stage * BM * kS;
  const T* sdO = sm.dout + (Tr::kDOStages == 2 ? stage : 0) * BM * kS;
  const int64_t hq = c.hkv * c.group + st.head;
  const int m0 = st.tile * BM;
  const int64_t row_base = (c.b * p.Hq + hq) * c.Tq;  // of lse, delta and dq_accum

  // This warp's block of S and dP; its rows x = 2 mt + h are s_row0 + 16 mt + g + 8 h.
  const int s_row0 = (warp % Tr::WM) * Tr::kSRows, s_key0 = (warp / Tr::WM) * Tr::kSKeys;
  float lse2[2 * SMT], delta[2 * SMT];  // L * log2(e) and D of the rows (rows past Tq: any
#pragma unroll                          // finite value, their P is masked to 0)
  for (int x = 0; x < 2 * SMT; ++x) {
    const int64_t i = min(m0 + s_row0 + 16 * (x >> 1) + g + 8 * (x & 1), c.Tq - 1);
    lse2[x] = p.lse[row_base + i] * kLog2e;
    delta[x] = p.delta[row_base + i];
  }

  // ALiBi: the head's slope * log2(e).
  [[maybe_unused]] const float slope = ALIBI ? p.alibi_slopes[hq] * kLog2e : 0.f;
#pragma unroll
  for (int ch = 0; ch < Tr::kSKeys / Tr::kSChunk; ++ch)
    scores_chunk<Tr, CAUSAL, ALIBI, WINDOW, MASK>(c, sm, sQ, sdO, m0, s_row0,
                                                  s_key0 + ch * Tr::kSChunk, lse2, delta, slope);
  __syncthreads();  // P and dS are complete

  // dV += P^T dO (line 12) and dK += dS^T Q (line 16; the scale is applied once at the end).
  const int kv_key0 = (warp % Tr::KV_WN) * Tr::kKVKeys, kv_col0 = (warp / Tr::KV_WN) * Tr::kKVCols;
  warp_mma<T, KMT, KNT, BM, true, true>(dv, sm.p, kSP, kv_key0, sdO, kS, kv_col0, lane);
  if constexpr (Tr::kDOStages == 1) {
    __syncthreads();  // every warp is done with dO: the next step's dO loads during dK and dQ
    if (has_next) load_query_tile<Tr, T>(sm.dout, p.dout, p.dout_stride, c, next, tid);
    cp_async_commit();
  }
  warp_mma<T, KMT, KNT, BM, true, true>(dk, sm.ds, kSP, kv_key0, sQ, kS, kv_col0, lane);

  // dQ += dS K (line 15) into the float32 accumulator, with atomics (other CTAs add the other
  // key tiles' parts); the deterministic path leaves dQ to its own kernel.
  if (!p.deterministic) {
    constexpr int QMT = Tr::kQRows / 16, QNT = Tr::kQCols / 8;
    const int q_row0 = (warp % Tr::DQ_WM) * Tr::kQRows, q_col0 = (warp / Tr::DQ_WM) * Tr::kQCols;
    float dq[QMT][QNT][4];
    zero(dq);
    warp_mma<T, QMT, QNT, Tr::BN, false, true>(dq, sm.ds, kSP, q_row0, sm.k, kS, q_col0, lane);
    float* acc = p.dq_accum + (row_base + m0) * Tr::kD + q_col0 + 2 * tq;
#pragma unroll
    for (int mt = 0; mt < QMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = q_row0 + 16 * mt + g + 8 * h;  // row in the tile
        if (MASK && m0 + r >= c.Tq) continue;
#pragma unroll
        for (int nt = 0; nt < QNT; ++nt)
          atomic_add2(acc + r * Tr::kD + nt * 8, dq[mt][nt][2 * h], dq[mt][nt][2 * h + 1]);
      }
  }
}

// ----------------------------------------------------------------------------------------------
// The kernel: one CTA per (BN keys, kv head, batch). ALIBI and WINDOW are template flags, and each
// step runs one of two copies of the step, with the mask or without it (tiles on the causal
// diagonal, at the window's edge, past Tq or past Tk); indices are 32-bit.
template <typename T, int D, bool LARGE, bool CAUSAL, bool ALIBI, bool WINDOW>
__global__ void __launch_bounds__(BwdTraits<T, D, LARGE>::kThreads)
    attention_bwd_dkdv_kernel(const AttentionParams p) {
  static_assert(CAUSAL || !WINDOW, "the window needs the causal mask");
  using Tr = BwdTraits<T, D, LARGE>;
  constexpr int BM = Tr::BM, BN = Tr::BN;
  constexpr int KMT = Tr::kKVKeys / 16, KNT = Tr::kKVCols / 8;
  const DkdvSmem<Tr, T> sm(dynamic_smem<T>());
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  DkdvCta c;
  c.Tq = static_cast<int>(p.Tq);
  c.Tk = static_cast<int>(p.Tk);
  c.offset = c.Tk - c.Tq;
  c.window = WINDOW ? static_cast<int>(min64(p.window, p.Tk + 1)) : 0;
  c.group = static_cast<int>(p.Hq) / static_cast<int>(p.Hkv);  // Hq <= 65535
  c.n0 = blockIdx.x * BN;
  c.hkv = blockIdx.y;
  c.b = blockIdx.z;
  c.scale_log2 = p.scale * kLog2e;
  // Causal: query i sees key j iff j <= i + offset, so no query before n0 - offset sees this
  // tile; with a window also j > i + offset - window, so none from q_end on.
  const int q_first = CAUSAL ? max(0, c.n0 - c.offset) : 0;
  const int q_end = static_cast<int>(window_query_end<CAUSAL>(p, c.n0, BN));
  c.qt_begin = q_first / BM;
  c.per_head = q_first < q_end ? ceil_div32(q_end, BM) - c.qt_begin : 0;
  const int n_iters = c.group * c.per_head;  // (query head, query tile) steps

  load_rows<BN, D, Tr::kThreads>(sm.k, static_cast<const T*>(p.k) + c.b * p.k_stride.b +
                                           c.hkv * p.k_stride.h, p.k_stride.t, c.n0, c.Tk, tid);
  load_rows<BN, D, Tr::kThreads>(sm.v, static_cast<const T*>(p.v) + c.b * p.v_stride.b +
                                           c.hkv * p.v_stride.h, p.v_stride.t, c.n0, c.Tk, tid);
  DkdvStep cur{0, c.qt_begin};
  if (n_iters > 0) {
    load_query_tile<Tr, T>(sm.q, p.q, p.q_stride, c, cur, tid);
    load_query_tile<Tr, T>(sm.dout, p.dout, p.dout_stride, c, cur, tid);
  }
  cp_async_commit();

  float dk[KMT][KNT][4], dv[KMT][KNT][4];
  zero(dk);
  zero(dv);
  // The (head, tile) pair is advanced by counting, not by dividing.
  auto next_step = [&](DkdvStep s) {
    return s.tile + 1 - c.qt_begin == c.per_head ? DkdvStep{s.head + 1, c.qt_begin}
                                                 : DkdvStep{s.head, s.tile + 1};
  };
  auto needs_mask = [&](int tile) {
    const int m0 = tile * BM;
    return m0 + BM > c.Tq || c.n0 + BN > c.Tk || (CAUSAL && c.n0 + BN - 1 > m0 + c.offset) ||
           (WINDOW && c.n0 <= min(m0 + BM, c.Tq) - 1 + c.offset - c.window);
  };
  // Runs of mask-free steps, each followed by at most one masked step.
  for (int it = 0; it < n_iters;) {
    for (; it < n_iters && !needs_mask(cur.tile); ++it, cur = next_step(cur))
      dkdv_step<Tr, CAUSAL, ALIBI, WINDOW, false>(p, c, sm, cur, it & 1, it + 1 < n_iters,
                                                  next_step(cur), dk, dv);
    if (it < n_iters) {
      dkdv_step<Tr, CAUSAL, ALIBI, WINDOW, true>(p, c, sm, cur, it & 1, it + 1 < n_iters,
                                                 next_step(cur), dk, dv);
      ++it;
      cur = next_step(cur);
    }
  }
  cp_async_wait<0>();

  // Key rows no query can see keep dK = dV = 0.
  const int g = lane / 4, tq = lane % 4;
  const int key0 = c.n0 + (warp % Tr::KV_WN) * Tr::kKVKeys;
  const int col0 = (warp / Tr::KV_WN) * Tr::kKVCols + 2 * tq;
  T* dkb = static_cast<T*>(p.dk) + c.b * p.dk_stride.b + c.hkv * p.dk_stride.h + col0;
  T* dvb = static_cast<T*>(p.dv) + c.b * p.dv_stride.b + c.hkv * p.dv_stride.h + col0;
#pragma unroll
  for (int mt = 0; mt < KMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = key0 + 16 * mt + g + 8 * h;
      if (j >= c.Tk) continue;
#pragma unroll
      for (int nt = 0; nt < KNT; ++nt) {
        store_b32(dkb + j * p.dk_stride.t + nt * 8,
                  pack2<T>(dk[mt][nt][0 + 2 * h] * p.scale, dk[mt][nt][1 + 2 * h] * p.scale));
        store_b32(dvb + j * p.dv_stride.t + nt * 8, pack2<T>(dv[mt][nt][2 * h], dv[mt][nt][2 * h + 1]));
      }
    }
}
