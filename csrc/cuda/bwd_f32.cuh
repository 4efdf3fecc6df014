// minigpt attention on CUDA: the float32 dK/dV and dQ kernels of the backward (CUDA cores).
// Included by attention_bwd.cu and attention_bwd_v1.cu (the float32 kernels are the same in
// both kernel sets), inside each one's anonymous namespace: their launchers instantiate them.
#pragma once

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
      sLse[r] = valid ? p.lse[idx] : 0.f;
      sDelta[r] = valid ? p.delta[idx] : 0.f;
    }
    __syncthreads();

    // Warp w: keys w, w + 4, w + 8, w + 12; lane: query m0 + lane.
    const int64_t i = m0 + lane;
    const float slope = alibi_slope(p, hq);
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
      float x = sv * p.scale;
      if (alibi) x = fmaf(slope, static_cast<float>(j - i - offset), x);
      float pv = exp_of_difference(x, sLse[lane]);
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
  const int64_t hkv = static_cast<int>(hq) / (static_cast<int>(p.Hq) / static_cast<int>(p.Hkv));
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
  float lse[4], delta[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t i = m0 + warp + 4 * k;
    const bool valid = i < p.Tq;
    const int64_t idx = (b * p.Hq + hq) * p.Tq + i;
    lse[k] = valid ? p.lse[idx] : 0.f;
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
  const bool alibi = p.alibi_slopes != nullptr;
  const float slope = alibi_slope(p, hq);

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
      float x = sv * p.scale;
      if (alibi) x = fmaf(slope, static_cast<float>(j - i - offset), x);
      float pv = exp_of_difference(x, lse[kr]);
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
