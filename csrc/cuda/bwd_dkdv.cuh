// minigpt attention on CUDA: the bf16/fp16 dK/dV kernel of the backward (tensor cores).
// Included once by attention_bwd.cu, inside its anonymous namespace (it is part of that
// translation unit: the launchers there instantiate these kernels).
#pragma once

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

// ALIBI and WINDOW are template flags, and each query tile runs one of two copies of the loop
// body, with the mask or without it (see attention_fwd_kernel); indices are 32-bit.
template <typename T, int D, int BM, bool CAUSAL, bool ALIBI, bool WINDOW>
__global__ void __launch_bounds__(128) attention_bwd_dkdv_kernel(const AttentionParams p) {
  static_assert(CAUSAL || !WINDOW, "the window needs the causal mask");
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

  // 32-bit sizes (the host checked fits_int32_indices).
  const int Tq = static_cast<int>(p.Tq), Tk = static_cast<int>(p.Tk);
  const int n0 = blockIdx.x * BN;
  const int64_t hkv = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int group = static_cast<int>(p.Hq) / static_cast<int>(p.Hkv);  // Hq <= 65535
  const int offset = Tk - Tq;
  const int window = WINDOW ? static_cast<int>(min64(p.window, p.Tk + 1)) : 0;

  // Causal: query i sees key j iff j <= i + offset, so no query before n0 - offset sees this tile;
  // with a window also j > i + offset - window, so none from q_end on.
  const int q_first = CAUSAL ? max(0, n0 - offset) : 0;
  const int q_end = static_cast<int>(window_query_end<CAUSAL>(p, n0, BN));
  const int qt_begin = q_first / BM;
  const int per_head = q_first < q_end ? ceil_div32(q_end, BM) - qt_begin : 0;
  const int n_iters = group * per_head;  // (query head, query tile) steps

  // K and V tiles: loaded once.
  {
    const T* kb = static_cast<const T*>(p.k) + b * p.k_stride.b + hkv * p.k_stride.h;
    const T* vb = static_cast<const T*>(p.v) + b * p.v_stride.b + hkv * p.v_stride.h;
    for (int c = tid; c < BN * kChunks; c += kThreads) {
      const int row = c / kChunks;
      const int ch = c % kChunks;
      const int j = n0 + row;
      const bool valid = j < Tk;
      const int64_t jj = valid ? j : 0;
      cp_async_16(sK + row * kS + ch * 8, kb + jj * p.k_stride.t + ch * 8, valid);
      cp_async_16(sV + row * kS + ch * 8, vb + jj * p.v_stride.t + ch * 8, valid);
    }
    cp_async_commit();
  }

  // Step it is query head hkv * group + it / per_head, query tile qt_begin + it % per_head; the
  // pair is advanced by counting, not by dividing.
  struct Step {
    int head;  // in the group
    int tile;  // qt_begin + ...
  };
  auto next_step = [&](Step s) {
    return s.tile + 1 - qt_begin == per_head ? Step{s.head + 1, qt_begin} : Step{s.head, s.tile + 1};
  };
  auto load_q = [&](Step st, int stage) {
    const int64_t hq = hkv * group + st.head;
    const int m0 = st.tile * BM;
    const T* qb = static_cast<const T*>(p.q) + b * p.q_stride.b + hq * p.q_stride.h;
    const T* ob = static_cast<const T*>(p.dout) + b * p.dout_stride.b + hq * p.dout_stride.h;
    T* dq = sQ + stage * BM * kS;
    T* dob = sdO + stage * BM * kS;
    for (int c = tid; c < BM * kChunks; c += kThreads) {
      const int row = c / kChunks;
      const int ch = c % kChunks;
      const int i = m0 + row;
      const bool valid = i < Tq;
      const int64_t ii = valid ? i : 0;
      cp_async_16(dq + row * kS + ch * 8, qb + ii * p.q_stride.t + ch * 8, valid);
      cp_async_16(dob + row * kS + ch * 8, ob + ii * p.dout_stride.t + ch * 8, valid);
    }
    // Stage `stage` was last read in the step before the previous one, which ended in a barrier.
    const int64_t row_base = (b * p.Hq + hq) * p.Tq;
    for (int r = tid; r < BM; r += kThreads) {
      const int i = m0 + r;
      const bool valid = i < Tq;
      const int64_t idx = row_base + (valid ? i : 0);
      sLse[stage * BM + r] = valid ? p.lse[idx] * kLog2e : 0.f;
      sDelta[stage * BM + r] = valid ? p.delta[idx] : 0.f;
    }
  };
  Step cur{0, qt_begin};
  if (n_iters > 0) load_q(cur, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  const float scale_log2 = p.scale * kLog2e;
  const bool accumulate_dq = !p.deterministic;

  auto body = [&](auto mask_tag, int it) {
    constexpr bool MASK = decltype(mask_tag)::value;
    const int stage = it & 1;
    if (it + 1 < n_iters) load_q(next_step(cur), stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // K/V and this step's Q/dO have landed
    __syncthreads();
    const int64_t hq = hkv * group + cur.head;
    const int m0 = cur.tile * BM;
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
    // ALiBi: the head's slope * log2(e) and j - i' of this thread's key row g, query column 2 tq.
    [[maybe_unused]] const float slope = ALIBI ? p.alibi_slopes[hq] * kLog2e : 0.f;
    [[maybe_unused]] const float dist0 =
        static_cast<float>(n0 + warp * 16 + g - m0 - 2 * tq - offset);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = nt * 8 + 2 * tq + (e & 1);
        // scale * S * log2(e) - L * log2(e) as one FFMA (and one more for ALiBi's bias)
        float x = fmaf(st[nt][e], scale_log2, -cLse[ql]);
        if constexpr (ALIBI)
          x = fmaf(slope, dist0 + static_cast<float>(8 * (e >> 1) - nt * 8 - (e & 1)), x);
        float pv = exp2f(x);
        if constexpr (MASK) {
          const int i = m0 + ql;
          const int j = n0 + warp * 16 + g + 8 * (e >> 1);
          if (i >= Tq || j >= Tk || (CAUSAL && j > i + offset) ||
              (WINDOW && j <= i + offset - window))
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
        const int i = m0 + wr * 16 + g + 8 * h;
        if (i >= Tq) continue;
#pragma unroll
        for (int nt = 0; nt < Tr::kDC / 8; ++nt) {
          const int64_t col = wc * Tr::kDC + nt * 8 + 2 * tq;
          atomic_add2(acc + static_cast<int64_t>(i) * D + col, dqa[nt][2 * h], dqa[nt][2 * h + 1]);
        }
      }
    }
    __syncthreads();  // this stage and sdS are free for the next step
  };
  auto needs_mask = [&](int tile) {
    const int m0 = tile * BM;
    return m0 + BM > Tq || n0 + BN > Tk || (CAUSAL && n0 + BN - 1 > m0 + offset) ||
           (WINDOW && n0 <= min(m0 + BM, Tq) - 1 + offset - window);
  };
  // Runs of mask-free steps, each followed by at most one masked step.
  for (int it = 0; it < n_iters;) {
    for (; it < n_iters && !needs_mask(cur.tile); ++it, cur = next_step(cur))
      body(BoolTag<false>{}, it);
    if (it < n_iters) {
      body(BoolTag<true>{}, it);
      ++it;
      cur = next_step(cur);
    }
  }
  cp_async_wait<0>();

  // Key rows no query can see keep dK = dV = 0.
  T* dkb = static_cast<T*>(p.dk) + b * p.dk_stride.b + hkv * p.dk_stride.h;
  T* dvb = static_cast<T*>(p.dv) + b * p.dv_stride.b + hkv * p.dv_stride.h;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t j = n0 + warp * 16 + g + 8 * h;
    if (j >= Tk) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + 2 * tq;
      store_b32(dkb + j * p.dk_stride.t + col,
                pack2<T>(dk[dt][2 * h] * p.scale, dk[dt][2 * h + 1] * p.scale));
      store_b32(dvb + j * p.dv_stride.t + col, pack2<T>(dv[dt][2 * h], dv[dt][2 * h + 1]));
    }
  }
}
