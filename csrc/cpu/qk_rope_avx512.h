// minigpt: QK-norm and RoPE (csrc/qk_rope_cpu.cpp) for bfloat16 in and out on AVX-512, the
// case of CPU training under bf16 autocast. Included once by qk_rope_cpu.cpp inside its
// anonymous namespace, after <immintrin.h>.
//
// The same arithmetic as forward_rows and backward_rows there, 16 lanes at a time, operation
// for operation, so that the results are the same bits: RoPE's pairs (x[2i], x[2i+1]) sit in
// neighbouring lanes, so the rotation is y * C + swap(y) * S, with swap exchanging the lanes of
// each pair and, for position t, C[d] = cos(a_{d/2}) and S[d] = -sin, +sin for even, odd d
// (expanded once per position for all its heads); a + (-b) is a - b exactly. Every product is
// rounded before its sum (no fused multiply-add, as the portable code compiled for the baseline
// x86-64 has none); the sums (mean(x^2), mean(dn * n)) keep dot_lanes' 16 partial sums and its
// order of adding them; bfloat16 is rounded to nearest even (a NaN stays a quiet NaN), as
// to_elem does.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MINIGPT_HAVE_QK_AVX512 1

// Whether the attention kernels' vector path is avx512 (isa_paths.h picks it only where the CPU
// and its operating system run AVX-512F/BW/VL/DQ; MINIGPT_CPU_ISA=avx2 or portable keeps the
// portable code here too).
bool qk_rope_avx512_enabled() {
  static const bool on = std::strcmp(attention_cpu_isa(), "avx512") == 0;
  return on;
}

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// GCC's intrinsics start some vectors from _mm512_undefined_*(), which it then reports as
// possibly uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace qk512 {

// Products, sums and differences that the compiler may not fuse into a multiply-add (the
// plain intrinsics are vector arithmetic that GCC contracts): the explicit-rounding forms, at
// the current rounding mode (round to nearest), compile to the plain instructions.
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_round_ps(a, b, _MM_FROUND_CUR_DIRECTION); }
inline __m512 add(__m512 a, __m512 b) { return _mm512_add_round_ps(a, b, _MM_FROUND_CUR_DIRECTION); }
inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_round_ps(a, b, _MM_FROUND_CUR_DIRECTION); }

// Lanes d0 .. d0 + 15 that are below D.
inline __mmask16 lanes(int64_t d0, int64_t D) {
  const int64_t n = std::min<int64_t>(16, D - d0);
  return static_cast<__mmask16>((1u << n) - 1);
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

inline void store_bf16(uint16_t* p, __m512 x, __mmask16 m) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

// dot_lanes' sum (row_reductions.h) from its 16 partial sums (the full chunks of 16) and the
// products of the last, partial chunk (lanes below tail_n): the tail first, then the partials
// in lane order.
inline float lanes_sum(__m512 part, __m512 tail, int64_t tail_n) {
  float p[16], q[16];
  _mm512_storeu_ps(p, part);
  _mm512_storeu_ps(q, tail);
  float sum = 0.0f;
  for (int64_t i = 0; i < tail_n; ++i) sum += q[i];
  for (int l = 0; l < 16; ++l) sum += p[l];
  return sum;
}

// Exchanges the two lanes of each pair (2i, 2i + 1).
inline __m512 swap_pairs(__m512 y) { return _mm512_permute_ps(y, 0xB1); }

// C and S of position t (D floats each; see the top of this file).
inline void expand_angles(const float* ct, const float* sn, int64_t P, float* C, float* S) {
  for (int64_t i = 0; i < P; ++i) {
    C[2 * i] = C[2 * i + 1] = ct[i];
    S[2 * i] = -sn[i];
    S[2 * i + 1] = sn[i];
  }
}

// forward_rows for bfloat16 qkv and bfloat16 outputs.
void forward_rows(const Operands& a, const uint16_t* x, uint16_t* q, uint16_t* k, uint16_t* v,
                  float* rs, float eps, bool norm) {
  const int64_t T_ = a.T, H = a.n_q + a.n_k, D = a.D, P = a.P;
  at::parallel_for(0, a.B * T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> C(D), S(D);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T_, t = bt % T_;
      const uint16_t* xr = x + b * a.sb + t * a.st;
      expand_angles(a.c + t * P, a.s + t * P, P, C.data(), S.data());
      for (int64_t h = 0; h < H; ++h) {
        const bool is_q = h < a.n_q;
        const uint16_t* xh = xr + h * D;
        uint16_t* o = is_q ? q + (bt * a.n_q + h) * D : k + (bt * a.n_k + h - a.n_q) * D;
        const float* g = is_q ? a.gq : a.gk;
        float r = 1.f;
        if (norm) {
          __m512 ss = _mm512_setzero_ps(), tail = _mm512_setzero_ps();
          for (int64_t d0 = 0; d0 < D; d0 += 16) {
            const __m512 xv = load_bf16(xh + d0, lanes(d0, D));
            if (d0 + 16 <= D)
              ss = add(ss, mul(xv, xv));
            else
              tail = mul(xv, xv);
          }
          r = 1.f / std::sqrt(lanes_sum(ss, tail, D % 16) / static_cast<float>(D) + eps);
          rs[bt * H + h] = r;
        }
        const __m512 rv = _mm512_set1_ps(r);
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          const __mmask16 m = lanes(d0, D);
          __m512 y = mul(load_bf16(xh + d0, m), rv);
          if (g) y = mul(y, _mm512_maskz_loadu_ps(m, g + d0));
          const __m512 out = add(
              mul(y, _mm512_maskz_loadu_ps(m, C.data() + d0)),
              mul(swap_pairs(y), _mm512_maskz_loadu_ps(m, S.data() + d0)));
          store_bf16(o + d0, out, m);
        }
      }
      // The values: bfloat16 to bfloat16 is a copy.
      std::memcpy(v + bt * a.n_k * D, xr + H * D, a.n_k * D * sizeof(uint16_t));
    }
  });
}

// backward_rows for bfloat16 qkv and bfloat16 gradients (gq, gk, gv: (B, T, heads, D) with
// strides sb, st, sh in elements), into dx (B, T, width) bfloat16.
void backward_rows(const Operands& a, const uint16_t* x, const uint16_t* gq, int64_t gq_sb,
                   int64_t gq_st, int64_t gq_sh, const uint16_t* gk, int64_t gk_sb, int64_t gk_st,
                   int64_t gk_sh, const uint16_t* gv, int64_t gv_sb, int64_t gv_st, int64_t gv_sh,
                   const float* rs, uint16_t* dx, std::vector<float>& dgain, int64_t workers,
                   bool norm) {
  const int64_t T_ = a.T, H = a.n_q + a.n_k, D = a.D, P = a.P, W = (H + a.n_k) * D;
  const int64_t chunk = (a.B * T_ + workers - 1) / workers;
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> C(D), S(D), dy(D), n(D);
    for (int64_t w = w0; w < w1; ++w) {
      float* dg = dgain.data() + w * 2 * D;
      for (int64_t bt = w * chunk; bt < std::min(a.B * T_, (w + 1) * chunk); ++bt) {
        const int64_t b = bt / T_, t = bt % T_;
        const uint16_t* xr = x + b * a.sb + t * a.st;
        uint16_t* dxr = dx + bt * W;
        expand_angles(a.c + t * P, a.s + t * P, P, C.data(), S.data());
        for (int64_t h = 0; h < H; ++h) {
          const bool is_q = h < a.n_q;
          const uint16_t* gh = is_q ? gq + b * gq_sb + t * gq_st + h * gq_sh
                                    : gk + b * gk_sb + t * gk_st + (h - a.n_q) * gk_sh;
          const uint16_t* xh = xr + h * D;
          uint16_t* dxh = dxr + h * D;
          const float* g = is_q ? a.gq : a.gk;
          float* dgh = dg + (is_q ? 0 : D);
          const float r = norm ? rs[bt * H + h] : 1.f;
          const __m512 rv = _mm512_set1_ps(r);
          __m512 dot = _mm512_setzero_ps(), tail = _mm512_setzero_ps();
          for (int64_t d0 = 0; d0 < D; d0 += 16) {
            const __mmask16 m = lanes(d0, D);
            // The inverse rotation: dy = gr * C - swap(gr) * S.
            const __m512 gr = load_bf16(gh + d0, m);
            __m512 dyv = sub(
                mul(gr, _mm512_maskz_loadu_ps(m, C.data() + d0)),
                mul(swap_pairs(gr), _mm512_maskz_loadu_ps(m, S.data() + d0)));
            if (!norm) {
              store_bf16(dxh + d0, dyv, m);
              continue;
            }
            const __m512 nv = mul(load_bf16(xh + d0, m), rv);
            if (g) {
              _mm512_mask_storeu_ps(dgh + d0, m, add(_mm512_maskz_loadu_ps(m, dgh + d0),
                                                               mul(dyv, nv)));
              dyv = mul(dyv, _mm512_maskz_loadu_ps(m, g + d0));  // dn
            }
            if (d0 + 16 <= D)
              dot = add(dot, mul(dyv, nv));
            else
              tail = mul(dyv, nv);
            _mm512_mask_storeu_ps(dy.data() + d0, m, dyv);
            _mm512_mask_storeu_ps(n.data() + d0, m, nv);
          }
          if (!norm) continue;
          const __m512 mean = _mm512_set1_ps(lanes_sum(dot, tail, D % 16) / static_cast<float>(D));
          for (int64_t d0 = 0; d0 < D; d0 += 16) {
            const __mmask16 m = lanes(d0, D);
            const __m512 nv = _mm512_maskz_loadu_ps(m, n.data() + d0);
            const __m512 dyv = _mm512_maskz_loadu_ps(m, dy.data() + d0);
            store_bf16(dxh + d0, mul(rv, sub(dyv, mul(nv, mean))), m);
          }
        }
        for (int64_t h = 0; h < a.n_k; ++h)  // the values' gradient: a copy
          std::memcpy(dxr + (H + h) * D, gv + b * gv_sb + t * gv_st + h * gv_sh,
                      D * sizeof(uint16_t));
      }
    }
  });
}

}  // namespace qk512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#else
bool qk_rope_avx512_enabled() { return false; }
#endif
