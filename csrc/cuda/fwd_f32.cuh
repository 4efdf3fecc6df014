// minigpt attention on CUDA: the float32 forward kernel (CUDA cores).
// Included by attention_fwd.cu and attention_fwd_v1.cu (the float32 kernels are the same in
// both kernel sets), inside each one's anonymous namespace: their launchers instantiate them.
#pragma once

// ----------------------------------------------------------------------------------------------
// float32 CUDA-core forward.

template <int D>
struct FwdF32Traits {
  static constexpr int BM = 16;  // rows per CTA, 4 per warp
  static constexpr int BN = 32;  // keys per step, one per lane
  static constexpr int kThreads = 128;
  static constexpr int kCols = D / 8;  // output columns per thread
  static constexpr int kS = D + 1;     // odd stride: lane-indexed rows hit distinct banks
  static constexpr int kP = BN + 1;
  static constexpr size_t kSmemBytes =
      sizeof(float) * static_cast<size_t>(BM * kS + BN * kS + BN * D + BM * kP + 2 * BM);
};

template <int D, bool CAUSAL>
__global__ void __launch_bounds__(128) attention_fwd_f32_kernel(const AttentionParams p) {
  using Tr = FwdF32Traits<D>;
  constexpr int BM = Tr::BM, BN = Tr::BN, kS = Tr::kS, kP = Tr::kP, kThreads = Tr::kThreads;

  float* sQ = dynamic_smem<float>();  // [BM][kS]
  float* sK = sQ + BM * kS;           // [BN][kS]
  float* sV = sK + BN * kS;           // [BN][D]
  float* sP = sV + BN * D;            // [BM][kP] probabilities of the current step
  float* sCorr = sP + BM * kP;        // [BM] rescale factor of the current step
  float* sL = sCorr + BM;             // [BM] final row sums

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  const int64_t group = p.Hq / p.Hkv;
  const int64_t rows = group * p.Tq;
  const int64_t r0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * BM;
  const int64_t hkv = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t offset = p.Tk - p.Tq;

  const int64_t r_last = min64(r0 + BM, rows) - 1;
  const TileRuns tiles = key_tiles<CAUSAL>(p, r0, r_last, BN);
  const int n_steps = tiles.count();

  const float* q = static_cast<const float*>(p.q);
  for (int c = tid; c < BM * D; c += kThreads) {
    const int row = c / D;
    const int d = c % D;
    const int64_t r = r0 + row;
    float x = 0.f;
    if (r < rows) {
      const PackedRow pr = unpack_row(r, hkv, group, p.Tq);
      x = q[b * p.q_stride.b + pr.head * p.q_stride.h + pr.i * p.q_stride.t + d];
    }
    sQ[row * kS + d] = x;
  }

  // Warp w owns rows w, w + 4, w + 8, w + 12 for the softmax; its lanes hold identical stats.
  float m_run[4], l_run[4], slope[4];
  int64_t last_key[4], first_vis[4];
  const bool alibi = p.alibi_slopes != nullptr;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    m_run[k] = -INFINITY;
    l_run[k] = 0.f;
    const int64_t r = r0 + warp + 4 * k;
    const PackedRow pr = unpack_row(r < rows ? r : rows - 1, hkv, group, p.Tq);
    last_key[k] = pr.i + offset;
    first_vis[k] = CAUSAL ? first_key(p, pr.i) : 0;
    slope[k] = alibi_slope(p, pr.head);
  }
  // Thread owns output row tid / 8, columns tid % 8 + 8 c.
  const int orow = tid / 8;
  const int ocol = tid % 8;
  float o[Tr::kCols];
#pragma unroll
  for (int c = 0; c < Tr::kCols; ++c) o[c] = 0.f;

  const float* k = static_cast<const float*>(p.k) + b * p.k_stride.b + hkv * p.k_stride.h;
  const float* v = static_cast<const float*>(p.v) + b * p.v_stride.b + hkv * p.v_stride.h;

  for (int step = 0; step < n_steps; ++step) {
    const int64_t n0 = static_cast<int64_t>(tiles.at(step)) * BN;
    __syncthreads();  // Q is stored / the previous step's readers are done
    for (int c = tid; c < BN * D; c += kThreads) {
      const int row = c / D;
      const int d = c % D;
      const int64_t j = n0 + row;
      const bool valid = j < p.Tk;
      sK[row * kS + d] = valid ? k[j * p.k_stride.t + d] : 0.f;
      sV[row * D + d] = valid ? v[j * p.v_stride.t + d] : 0.f;
    }
    __syncthreads();

#pragma unroll
    for (int kr = 0; kr < 4; ++kr) {
      const int row = warp + 4 * kr;
      const int64_t j = n0 + lane;
      float x = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) x += sQ[row * kS + d] * sK[lane * kS + d];
      x *= p.scale;
      if (alibi) x = fmaf(slope[kr], static_cast<float>(j - last_key[kr]), x);
      if (j >= p.Tk || (CAUSAL && (j > last_key[kr] || j < first_vis[kr]))) x = -INFINITY;
      const float m_new = fmaxf(m_run[kr], warp_max(x));
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float pr = exp_of_difference(x, base);
      const float corr = exp_of_difference(m_run[kr], base);
      l_run[kr] = l_run[kr] * corr + warp_sum(pr);
      m_run[kr] = m_new;
      sP[row * kP + lane] = pr;
      if (lane == 0) sCorr[row] = corr;
    }
    __syncthreads();

    const float corr = sCorr[orow];
#pragma unroll
    for (int c = 0; c < Tr::kCols; ++c) {
      float acc = o[c] * corr;
      for (int jj = 0; jj < BN; ++jj) acc += sP[orow * kP + jj] * sV[jj * D + ocol + 8 * c];
      o[c] = acc;
    }
  }

  if (lane == 0) {
#pragma unroll
    for (int kr = 0; kr < 4; ++kr) {
      const int row = warp + 4 * kr;
      sL[row] = l_run[kr];
      const int64_t r = r0 + row;
      if (r < rows) {
        const PackedRow pr = unpack_row(r, hkv, group, p.Tq);
        p.lse[(b * p.Hq + pr.head) * p.Tq + pr.i] =
            l_run[kr] > 0.f ? m_run[kr] + logf(l_run[kr]) : -INFINITY;
      }
    }
  }
  __syncthreads();

  const int64_t r = r0 + orow;
  if (r < rows) {
    const PackedRow pr = unpack_row(r, hkv, group, p.Tq);
    const float l = sL[orow];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* dst = static_cast<float*>(p.out) + b * p.out_stride.b + pr.head * p.out_stride.h +
                 pr.i * p.out_stride.t;
#pragma unroll
    for (int c = 0; c < Tr::kCols; ++c) dst[ocol + 8 * c] = o[c] * inv;
  }
}
