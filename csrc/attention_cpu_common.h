// minigpt attention: the CPU kernels' work partition, shared by the float32/float64 kernels
// (attention_cpu.cpp, csrc/cpu/attention_tiles.h) and the bfloat16/float16 ones
// (attention_cpu_bf16.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention.h"

namespace minigpt {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Cuts units [0, n) into at most `workers` contiguous ranges of near-equal total cost; returns
// the range bounds (size ranges + 1). Deterministic: depends only on the costs and the count.
inline std::vector<int64_t> split_by_cost(const int64_t* cost, int64_t n, int64_t workers) {
  workers = std::max<int64_t>(1, std::min(workers, n));
  int64_t total = 0;
  for (int64_t u = 0; u < n; ++u) total += cost[u];
  std::vector<int64_t> bounds{0};
  int64_t prefix = 0;
  for (int64_t u = 0; u < n; ++u) {
    const int64_t w = static_cast<int64_t>(bounds.size());
    // Close range w-1 before unit u once the prefix reaches w/workers of the total.
    if (w < workers && prefix * workers >= w * total && u > bounds.back()) bounds.push_back(u);
    prefix += cost[u];
  }
  bounds.push_back(n);
  return bounds;
}

// Keys [0, visible_key_end) are visible to some row of the query tile starting at r0 with nr rows.
inline int64_t visible_key_end(const AttentionParams& p, int64_t r0, int64_t nr) {
  if (!p.causal) return p.Tk;
  return std::clamp<int64_t>(r0 + nr + p.causal_offset(), 0, p.Tk);
}

// First query tile (of block_q rows) with a row that sees key j0 (without a window, query tiles
// from there on see it too).
inline int64_t first_query_tile(const AttentionParams& p, int64_t j0, int64_t block_q) {
  if (!p.causal) return 0;
  return std::max<int64_t>(0, j0 - p.causal_offset()) / block_q;
}

// One past the last query tile (of block_q rows) with a row that sees a key of [j0, j0 + nk): a
// window hides key j from the rows more than window - 1 positions after it.
inline int64_t query_tile_end(const AttentionParams& p, int64_t j0, int64_t nk, int64_t block_q) {
  const int64_t tiles = ceil_div(p.Tq, block_q);
  if (p.window <= 0) return tiles;
  const int64_t last_row = j0 + nk - 1 - p.causal_offset() + p.window - 1;
  return last_row < 0 ? 0 : std::min(tiles, last_row / block_q + 1);
}

}  // namespace minigpt
