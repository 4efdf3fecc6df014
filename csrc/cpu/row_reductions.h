// minigpt CPU kernels: float row reductions (sum, max, dot product) in kLanes independent
// partial results, compiled for AVX-512, AVX2 and the baseline (target_clones, chosen when the
// library loads). Shared by the bf16/fp16 attention tiles (cpu/cpu16_tiles.h) and the fused
// QK-norm + RoPE op (qk_rope_cpu.cpp). Includes no standard headers, so that it can be included
// inside a namespace: the includer provides <algorithm> and <cstdint>.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define MINIGPT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
// Clang does not take target_clones on function templates (and other architectures have no
// such targets): one build for the baseline there.
#define MINIGPT_CLONES
#endif

// Reductions keep kLanes independent partial results, so that the loops vectorise without
// -ffast-math (which would let the compiler reorder a single float sum).
constexpr int kLanes = 16;

MINIGPT_CLONES float sum_row(const float* x, int64_t n) {
  float part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += x[c + l];
  float sum = 0.0f;
  for (; c < n; ++c) sum += x[c];
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

MINIGPT_CLONES float max_row(const float* x, int64_t n, float m) {
  float part[kLanes];
  std::fill(part, part + kLanes, m);
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] = std::max(part[l], x[c + l]);
  for (; c < n; ++c) m = std::max(m, x[c]);
  for (int l = 0; l < kLanes; ++l) m = std::max(m, part[l]);
  return m;
}

// The dot product's body, inline: for short rows in a caller's own loop (the QK-norm op's head
// vectors of head_dim values), where dot_row's call through the clone dispatch would cost more
// than the sum (measured: the op's backward 1.1 against 0.7 ms at B 8, T 256, 12 heads of 32).
inline float dot_lanes(const float* a, const float* b, int64_t n) {
  float part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[c + l] * b[c + l];
  float sum = 0.0f;
  for (; c < n; ++c) sum += a[c] * b[c];
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

MINIGPT_CLONES float dot_row(const float* a, const float* b, int64_t n) {
  return dot_lanes(a, b, n);
}
