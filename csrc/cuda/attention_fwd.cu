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
// bf16/fp16: one CTA per (tile of BM packed rows, kv head, batch). As in FlashAttention-2
// (kernel_traits.h), 4 warps along BM = 128 rows, each warp owning 32 rows (MT = 2 m16 tiles), so
// every K and V fragment loaded by ldmatrix feeds 4 MMAs (D <= 96); for D = 128, whose 32-row
// warps would spill, 4 warps of 16 rows (BM = 64, MT = 1); 1 warp of 16 rows (BM = 16, MT = 1)
// for decode-sized problems. S = Q K^T and O += P V run on tensor cores (mma.sync m16n8k16, fp32
// accumulators); the softmax stays in registers; K/V tiles of BN = 64 rows stream through shared
// memory with cp.async double buffering (32-key tiles for D = 96 with 32-row warps). Q fragments
// stay in registers, except with 32-row warps and D = 96, where they are re-read from shared
// memory per key tile (FA2's Is_Q_in_regs = false) to stay within the register file.
// Rows are packed per GQA group: row r of kv head h_kv is query head h_kv * G + r / Tq, position
// r % Tq, so a decode step (Tq = 1) puts all G query heads of a group into one small tile.
//
// float32: a CUDA-core kernel (no tensor cores): 16 rows x 32 keys per step, one warp per row for
// the scores and softmax (lane = key), every thread accumulating D/8 output columns of one row.
// The float32 kernel is in fwd_f32.cuh, included below.
#include "common.cuh"

namespace minigpt {
namespace gpu {
namespace {

// ----------------------------------------------------------------------------------------------
// bf16 / fp16 tensor-core forward.

template <typename T, int D, int BM, int BN, int MT>
struct FwdTraits {
  static constexpr int kWarps = BM / (16 * MT);
  static constexpr int kThreads = kWarps * 32;
  // Shared rows padded by 16 bytes: the 8 row addresses of one ldmatrix land on distinct banks.
  static constexpr int kStride = D + 8;
  static constexpr size_t kSmemBytes = static_cast<size_t>(BM + 4 * BN) * kStride * sizeof(T);
  static_assert(D % 16 == 0 && BN % 16 == 0 && BM % (16 * MT) == 0, "tile sizes");
  static constexpr bool kQInRegs = MT == 1 || D <= 64;
};

// ALIBI and WINDOW are template flags (FlashAttention-2's Has_alibi / Is_local): a kernel without
// them carries no code for them. Each key tile runs one of two copies of the loop body: with the
// mask (tiles on the causal diagonal, at the window's edge or past Tk) or without it, so the
// mask-free loop has no masking instruction. Indices are 32-bit, bounds computed once per CTA.
template <typename T, int D, int BM, int BN, int MT, bool CAUSAL, bool ALIBI, bool WINDOW>
__global__ void __launch_bounds__(BM / (16 * MT) * 32)
    attention_fwd_kernel(const AttentionParams p) {
  static_assert(CAUSAL || !WINDOW, "the window needs the causal mask");
  using Tr = FwdTraits<T, D, BM, BN, MT>;
  constexpr int kRows = 2 * MT;  // C-fragment rows per thread: (m tile mt, half h) -> 2 mt + h
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

  // 32-bit sizes (the host checked fits_int32_indices).
  const int Tq = static_cast<int>(p.Tq), Tk = static_cast<int>(p.Tk);
  const int group = static_cast<int>(p.Hq) / static_cast<int>(p.Hkv);  // Hq <= 65535
  const int rows = group * Tq;  // packed (head in group, query) rows of this kv head
  const int offset = Tk - Tq;   // query i sees keys j <= i + offset
  const int window = WINDOW ? static_cast<int>(min64(p.window, p.Tk + 1)) : 0;
  // Heaviest (causal) tiles first: the last row tiles see the most keys.
  const int r0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * BM;
  const int64_t hkv = blockIdx.y;
  const int64_t b = blockIdx.z;

  // Query positions covered by this tile (a tile may straddle two heads of the group).
  const int r_last = min(r0 + BM, rows) - 1;
  const int h_first = r0 / Tq, h_last = r_last / Tq;
  const bool straddle = h_first != h_last;
  const int i_min = straddle ? 0 : r0 - h_first * Tq;
  const int i_max = straddle ? Tq - 1 : r_last - h_last * Tq;
  const TileRuns tiles = key_tiles32<CAUSAL, WINDOW>(Tq, Tk, window, r0, r_last, BN);
  const int n_steps = tiles.count();
  // A tile needs the mask if it reaches past Tk, past the diagonal of the tile's first query, or
  // below the window of its last query.
  const int diag_mask_from = CAUSAL ? i_min + offset - BN + 1 : Tk;  // n0 > this: masked
  const int window_mask_below = WINDOW ? first_key32(i_max, offset, window) : 0;
  const int tk_mask_from = Tk - BN;                                   // n0 > this: masked

  // Q tile: one cp.async group. Divisions by kChunks are by a constant (shifts, multiplies).
  const T* q_base = static_cast<const T*>(p.q) + b * p.q_stride.b;
  for (int c = tid; c < BM * kChunks; c += kThreads) {
    const int row = c / kChunks;
    const int ch = c % kChunks;
    const int r = r0 + row;
    const bool valid = r < rows;
    const T* src = q_base;
    if (valid) {
      const int hg = r / Tq;
      src += (hkv * group + hg) * p.q_stride.h + static_cast<int64_t>(r - hg * Tq) * p.q_stride.t +
             ch * 8;
    }
    cp_async_16(sQ + row * kS + ch * 8, src, valid);
  }
  cp_async_commit();

  const T* k_base = static_cast<const T*>(p.k) + b * p.k_stride.b + hkv * p.k_stride.h;
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_stride.b + hkv * p.v_stride.h;
  auto load_kv = [&](int n, int stage) {
    T* dk = sK + stage * BN * kS;
    T* dv = sV + stage * BN * kS;
    const int n0 = n * BN;
#pragma unroll
    for (int c = tid; c < BN * kChunks; c += kThreads) {
      const int row = c / kChunks;
      const int ch = c % kChunks;
      const int j = n0 + row;
      const bool valid = j < Tk;
      const int64_t jj = valid ? j : 0;
      cp_async_16(dk + row * kS + ch * 8, k_base + jj * p.k_stride.t + ch * 8, valid);
      cp_async_16(dv + row * kS + ch * 8, v_base + jj * p.v_stride.t + ch * 8, valid);
    }
  };
  if (n_steps > 0) load_kv(tiles.at(0), 0);
  cp_async_commit();

  cp_async_wait<1>();  // the Q group has landed
  __syncthreads();
  const int warp_row = warp * 16 * MT;  // this warp's first row in the tile
  // This warp's Q rows as A fragments, kept for the whole kernel where D <= 64.
  uint32_t qf[Tr::kQInRegs ? MT : 1][Tr::kQInRegs ? D / 16 : 1][4];
  if constexpr (Tr::kQInRegs) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldsm_x4(qf[mt][kk], sQ + lds_row_a(warp_row + 16 * mt, kk * 16, kS, lane));
  }

  // The rows this thread holds in C fragments: x = 2 mt + h -> row 16 mt + g + 8 h of the warp.
  int last_key[kRows], first_vis[kRows];
  float slope[kRows];  // ALiBi slope * log2(e) of the row's head
#pragma unroll
  for (int x = 0; x < kRows; ++x) {
    const int r0h = r0 + warp_row + 16 * (x >> 1) + g + 8 * (x & 1);
    // Rows past the end are computed on zeros and never stored; any finite limit will do.
    const int r = r0h < rows ? r0h : rows - 1;
    const int hg = r / Tq;
    const int i = r - hg * Tq;
    last_key[x] = i + offset;
    first_vis[x] = WINDOW ? first_key32(i, offset, window) : 0;
    slope[x] = ALIBI ? p.alibi_slopes[hkv * group + hg] * kLog2e : 0.f;
  }

  float o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.f;
  float m_run[kRows], l_run[kRows];  // running max of S * scale * log2(e); this thread's part of
#pragma unroll                       // the running row sum
  for (int x = 0; x < kRows; ++x) {
    m_run[x] = -INFINITY;
    l_run[x] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;
  // Without ALiBi the scores stay unscaled until exp2: the scale folds into one FFMA there.
  const float s_mul = ALIBI ? 1.f : scale_log2;

  auto body = [&](auto mask_tag, int step) {
    constexpr bool MASK = decltype(mask_tag)::value;
    const int stage = step & 1;
    if (step + 1 < n_steps) load_kv(tiles.at(step + 1), stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this step's tile has landed
    __syncthreads();
    const T* cK = sK + stage * BN * kS;
    const T* cV = sV + stage * BN * kS;

    // S = Q K^T: B[k = d][n = key] = K[key][d], so K rows load as B fragments directly; each
    // K fragment feeds the MT m tiles.
    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qs[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qs[mt][e] = qf[mt][kk][e];
        } else {
          ldsm_x4(qs[mt], sQ + lds_row_a(warp_row + 16 * mt, kk * 16, kS, lane));
        }
      }
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t kb[4];
        ldsm_x4(kb, cK + lds_row_b(np * 16, kk * 16, kS, lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * np], qs[mt], kb[0], kb[1]);
          mma_16816<T>(s[mt][2 * np + 1], qs[mt], kb[2], kb[3]);
        }
      }
    }

    // Online softmax (Alg. 1 line 10), base 2. Row x = 2 mt + (e >> 1).
    const int n0 = tiles.at(step) * BN;
    float mx[kRows];
#pragma unroll
    for (int x = 0; x < kRows; ++x) mx[x] = -INFINITY;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int x = 2 * mt + (e >> 1);
          float v = s[mt][nt][e];
          const int jl = nt * 8 + 2 * tq + (e & 1);  // key within the tile
          if constexpr (ALIBI)  // j - i' = n0 + jl - last_key, small integers: exact in float
            v = fmaf(slope[x], static_cast<float>(n0 + jl - last_key[x]), v * scale_log2);
          if constexpr (MASK) {
            const int j = n0 + jl;
            if (j >= Tk || (CAUSAL && j > last_key[x]) || (WINDOW && j < first_vis[x]))
              v = -INFINITY;
          }
          s[mt][nt][e] = v;
          mx[x] = fmaxf(mx[x], v);
        }
      }
    float base[kRows], corr[kRows];
#pragma unroll
    for (int x = 0; x < kRows; ++x) {
      const float m_new = fmaxf(m_run[x], quad_max(mx[x]) * s_mul);
      // A row with no visible key so far keeps m = -inf; subtracting 0 instead avoids inf - inf.
      base[x] = m_new == -INFINITY ? 0.f : m_new;
      corr[x] = exp2f(m_run[x] - base[x]);
      m_run[x] = m_new;
      l_run[x] *= corr[x];
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int x = 2 * mt + (e >> 1);
          s[mt][nt][e] = exp2f(fmaf(s[mt][nt][e], s_mul, -base[x]));
          l_run[x] += s[mt][nt][e];
        }
      }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][dt][e] *= corr[2 * mt + (e >> 1)];

    // O += P V: P from registers as A; B[k = key][n = d] = V[key][d] needs ldmatrix.trans; each
    // V fragment feeds the MT m tiles.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) c_to_a<T>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, cV + lds_row_a(kk * 16, dp * 16, kS, lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(o[mt][2 * dp], a[mt], vb[0], vb[1]);
          mma_16816<T>(o[mt][2 * dp + 1], a[mt], vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // all warps are done with this stage before it is refilled
  };
  auto needs_mask = [&](int step) {
    const int n0 = tiles.at(step) * BN;
    return n0 > tk_mask_from || (CAUSAL && n0 > diag_mask_from) ||
           (WINDOW && n0 < window_mask_below);
  };
  // Runs of mask-free tiles, each followed by at most one masked tile.
  for (int step = 0; step < n_steps;) {
    for (; step < n_steps && !needs_mask(step); ++step) body(BoolTag<false>{}, step);
    if (step < n_steps) body(BoolTag<true>{}, step++);
  }
  cp_async_wait<0>();

  // Epilogue (Alg. 1 lines 12-13): O / l and L = ln 2 * m + ln l.
  T* out_base = static_cast<T*>(p.out) + b * p.out_stride.b;
#pragma unroll
  for (int x = 0; x < kRows; ++x) {
    const int mt = x >> 1, h = x & 1;
    const float l = quad_sum(l_run[x]);
    const int r = r0 + warp_row + 16 * mt + g + 8 * h;
    if (r >= rows) continue;
    const int hg = r / Tq;
    const int i = r - hg * Tq;
    const int64_t head = hkv * group + hg;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* dst = out_base + head * p.out_stride.h + static_cast<int64_t>(i) * p.out_stride.t;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      store_b32(dst + dt * 8 + 2 * tq,
                pack2<T>(o[mt][dt][2 * h] * inv, o[mt][dt][2 * h + 1] * inv));
    if (tq == 0)
      p.lse[(b * p.Hq + head) * p.Tq + i] = l > 0.f ? m_run[x] * kLn2 + logf(l) : -INFINITY;
  }
}

#include "fwd_f32.cuh"

// ----------------------------------------------------------------------------------------------
// Launchers.

template <typename T, int D, bool CAUSAL, int BM, int BN, int MT, bool ALIBI, bool WINDOW>
int launch_fwd_half_kernel(const AttentionParams& p, cudaStream_t stream, int64_t tiles) {
  using Tr = FwdTraits<T, D, BM, BN, MT>;
  auto kernel = attention_fwd_kernel<T, D, BM, BN, MT, CAUSAL, ALIBI, WINDOW>;
  if (int err = prepare_smem(kernel, Tr::kSmemBytes)) return err;
  return launch(kernel, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.Hkv),
                             static_cast<unsigned>(p.B)),
                dim3(Tr::kThreads), Tr::kSmemBytes, stream, p);
}

template <typename T, int D, bool CAUSAL, int BM, int MT>
int launch_fwd_half(const AttentionParams& p, cudaStream_t stream) {
  // 32 rows per warp hold 2 x D/8 x 4 output and 2 x BN/8 x 4 score floats: for D >= 96 the
  // scores of 64-key tiles spill past the 255-register limit (ptxas), 32-key tiles do not.
  constexpr int BN = MT == 2 && D >= 96 ? 32 : 64;
  const int64_t tiles = ceil_div(p.Hq / p.Hkv * p.Tq, BM);
  if (tiles > 0x7fffffff || p.Hkv > 65535 || !fits_int32_indices(p)) return kErrGrid;
  return MINIGPT_BOOL_SWITCH(p.alibi_slopes != nullptr, kAlibi, [&] {
    return MINIGPT_BOOL_SWITCH(CAUSAL && p.window > 0, kWindow, [&] {
      if constexpr (kWindow && !CAUSAL) {
        return static_cast<int>(kErrShape);  // unreachable: the window needs causal
      } else {
        return launch_fwd_half_kernel<T, D, CAUSAL, BM, BN, MT, kAlibi, kWindow>(p, stream,
                                                                                 tiles);
      }
    });
  });
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
  // Few packed rows (decode): a 1-warp, 16-row tile instead of wasting most of a 128-row one.
  if (p.Hq / p.Hkv * p.Tq <= 16) return launch_fwd_half<T, D, CAUSAL, 16, 1>(p, stream);
  // D = 128 with 32 rows per warp spills past 255 registers even with 32-key tiles (ptxas):
  // there 4 warps of 16 rows (BM = 64).
  if constexpr (D <= 96) return launch_fwd_half<T, D, CAUSAL, 128, 2>(p, stream);
  else return launch_fwd_half<T, D, CAUSAL, 64, 1>(p, stream);
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
}  // namespace gpu

int attention_forward_cuda(const AttentionParams& p, void* stream_ptr) {
  using namespace gpu;
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

const char* attention_cuda_error_string(int code) {
  using namespace gpu;
  switch (code) {
    case kSuccess: return "success";
    case kErrHeadDim: return "unsupported head dim (see kCudaHeadDims in attention.h)";
    case kErrDType: return "unsupported dtype (the CUDA kernels support bfloat16, float16, float32)";
    case kErrShape:
      return "inconsistent sizes (negative sizes, Hkv == 0, Hq % Hkv != 0, or causal with Tq > Tk)";
    case kErrGrid: return "problem too large for one launch grid (batch or heads > 65535)";
    case kErrNullPointer: return "a required tensor or scratch pointer is null";
    case kErrAlignment:
      return "bfloat16/float16 rows must start on 16-byte boundaries (data pointer and strides)";
    case kErrArch: return "bfloat16/float16 kernels need a GPU of compute capability 8.0 or newer";
    case kErrSharedMemory: return "the GPU offers less shared memory per block than the kernel needs";
    default: break;
  }
  if (code > kErrCudaBase) return cudaGetErrorString(static_cast<cudaError_t>(code - kErrCudaBase));
  return "unknown minigpt CUDA attention error";
}

}  // namespace minigpt
