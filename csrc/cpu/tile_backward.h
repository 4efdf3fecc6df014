// minigpt attention, CPU tile code: the backward (FlashAttention-2, Alg. 2).
// Included by attention_tiles.h, inside one namespace per instruction set, after tile_vec.h
// and tile_forward.h.
// ---------------------------------------------------------------------------------------------
// Backward (Alg. 2) for units [u0, u1), unit = (b * Hkv + kvh) * key_tiles + j, with this
// worker's backward_tile_scratch(D) elements at scratch. dQ goes to dq_part, this worker's
// zero-filled buffer covering the (b, kv head) pairs from pair_first on, laid out
// (pair - pair_first, g, Tq, D).
template <typename T, int kD>
MINIGPT_INLINE void backward_units(const AttentionParams& p, const T* lse, const T* delta,
                                   T* dq_part, T* scratch, int64_t pair_first, int64_t u0,
                                   int64_t u1) {
  constexpr int W = kLanes<T>;
  const int64_t D = kD > 0 ? kD : p.D;
  const int64_t G = p.group_size();
  const int64_t key_tiles = ceil_div(p.Tk, kBlockK);
  const T scale = softmax_scale<T>(p);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);

  std::fill(scratch, scratch + backward_tile_scratch(D), T(0));
  T* kt = scratch;                   // (D, kBlockK): K_j^T, zero-padded columns
  T* vt = kt + D * kBlockK;          // (D, kBlockK): V_j^T
  T* pt = vt + D * kBlockK;          // (kBlockQ, kBlockK): S, then P
  T* ds = pt + kBlockQ * kBlockK;    // (kBlockQ, kBlockK): dP, then scale * dS
  T* dk_acc = ds + kBlockQ * kBlockK;  // (kBlockK, D)
  T* dv_acc = dk_acc + kBlockK * D;    // (kBlockK, D)
  T* k_pack = dv_acc + kBlockK * D;    // (kBlockK, D): K_j, rows side by side
  // Q and dO with rows not side by side (the model's layout; see forward_units) are copied,
  // G query heads of a (batch, kv head) pair at once, when this worker's units reach the pair:
  // every key tile of the pair reads them again.
  const bool pack_k = p.k_stride.t != D, pack = packs_q_dout(p);
  T* q_group = scratch + backward_tile_scratch(D);      // (G, Tq, D)
  T* do_group = q_group + (pack ? G * p.Tq * D : 0);   // (G, Tq, D)
  int64_t packed_pair = -1;

  for (int64_t u = u0; u < u1; ++u) {
    const int64_t j = u % key_tiles;
    const int64_t pair = u / key_tiles;
    const int64_t kvh = pair % p.Hkv;
    const int64_t b = pair / p.Hkv;
    const int64_t j0 = j * kBlockK;
    const int64_t nk = std::min(kBlockK, p.Tk - j0);
    const int64_t nk_pad = round_up(nk, W);
    const T* kj = k + b * p.k_stride.b + kvh * p.k_stride.h + j0 * p.k_stride.t;
    const T* vj = v + b * p.v_stride.b + kvh * p.v_stride.h + j0 * p.v_stride.t;

    for (int64_t c = 0; c < nk; ++c)  // row by row, as in forward_units
      for (int64_t d = 0; d < D; ++d) {
        kt[d * kBlockK + c] = kj[c * p.k_stride.t + d];
        vt[d * kBlockK + c] = vj[c * p.v_stride.t + d];
      }
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = nk; c < nk_pad; ++c) kt[d * kBlockK + c] = vt[d * kBlockK + c] = T(0);
    const T* kr = kj;  // K_j row-major, rows ldk apart
    int64_t ldk = p.k_stride.t;
    if (pack_k) {
      pack_rows(kj, ldk, 0, nk, nk, D, k_pack);
      kr = k_pack;
      ldk = D;
    }
    if (pack && pair != packed_pair) {
      packed_pair = pair;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        pack_rows(q + b * p.q_stride.b + h * p.q_stride.h, p.q_stride.t, 0, p.Tq, p.Tq, D,
                  q_group + g * p.Tq * D);
        pack_rows(dout + b * p.dout_stride.b + h * p.dout_stride.h, p.dout_stride.t, 0, p.Tq,
                  p.Tq, D, do_group + g * p.Tq * D);
      }
    }
    std::fill(dk_acc, dk_acc + nk * D, T(0));
    std::fill(dv_acc, dv_acc + nk * D, T(0));

    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kvh * G + g;
      const int64_t row_base = (b * p.Hq + h) * p.Tq;
      T* dq_h = dq_part + ((pair - pair_first) * G + g) * p.Tq * D;
      const bool alibi = p.alibi_slopes != nullptr;
      const T slope = alibi ? static_cast<T>(p.alibi_slopes[h]) : T(0);
      const Vec<T> score_scale = vset(alibi ? T(1) : scale);  // as in the forward
      const int64_t tile_end = query_tile_end(p, j0, nk, kBlockQ);
      for (int64_t i = first_query_tile(p, j0, kBlockQ); i < tile_end; ++i) {
        const int64_t r0 = i * kBlockQ;
        const int64_t nr = std::min(kBlockQ, p.Tq - r0);
        const T* qi = q + b * p.q_stride.b + h * p.q_stride.h + r0 * p.q_stride.t;
        const T* doi = dout + b * p.dout_stride.b + h * p.dout_stride.h + r0 * p.dout_stride.t;
        int64_t ldq = p.q_stride.t, lddo = p.dout_stride.t;
        if (pack) {
          qi = q_group + (g * p.Tq + r0) * D;
          doi = do_group + (g * p.Tq + r0) * D;
          ldq = lddo = D;
        }

        gemm<T, ALayout::RowMajor>(nr, nk_pad, D, qi, ldq, kt, kBlockK, pt, kBlockK,
                                   false);
        gemm<T, ALayout::RowMajor>(nr, nk_pad, D, doi, lddo, vt, kBlockK, ds, kBlockK,
                                   false);
        for (int64_t r = 0; r < nr; ++r) {
          const Vec<T> lse_r = vset(lse[row_base + r0 + r]);
          const Vec<T> delta_r = vset(delta[row_base + r0 + r]);
          T* p_row = pt + r * kBlockK;
          T* ds_row = ds + r * kBlockK;
          if (alibi) {
            for (int64_t c = 0; c < nk_pad; ++c)
              p_row[c] = alibi_score(p_row[c], scale, slope, r0 + r + p.causal_offset() - j0 - c);
          }
          for (int64_t c = 0; c < nk_pad; c += W) {
            const Vec<T> pv = vexp(vload(p_row + c) * score_scale - lse_r);
            vstore(p_row + c, pv);
            vstore(ds_row + c, pv * (vload(ds_row + c) - delta_r) * scale);
          }
          // Zero the padding columns and, on diagonal tiles, the keys this row may not see
          // (key j0 + c is visible to row r0 + r iff c <= r0 + r + offset - j0).
          // With a window, also the keys before the row's window (c < first_key - j0).
          const int64_t visible =
              p.causal ? std::clamp<int64_t>(r0 + r + p.causal_offset() - j0 + 1, 0, nk) : nk;
          std::fill(p_row + visible, p_row + nk_pad, T(0));
          std::fill(ds_row + visible, ds_row + nk_pad, T(0));
          if (p.window > 0) {
            const int64_t hidden = std::clamp<int64_t>(p.first_key(r0 + r) - j0, 0, visible);
            std::fill(p_row, p_row + hidden, T(0));
            std::fill(ds_row, ds_row + hidden, T(0));
          }
        }
        gemm<T, ALayout::Transposed>(nk, D, nr, pt, kBlockK, doi, lddo, dv_acc, D,
                                     true);
        gemm<T, ALayout::Transposed>(nk, D, nr, ds, kBlockK, qi, ldq, dk_acc, D, true);
        gemm<T, ALayout::RowMajor>(nr, D, nk, ds, kBlockK, kr, ldk, dq_h + r0 * D, D,
                                   true);
      }
    }

    T* dkj = dk + b * p.dk_stride.b + kvh * p.dk_stride.h + j0 * p.dk_stride.t;
    T* dvj = dv + b * p.dv_stride.b + kvh * p.dv_stride.h + j0 * p.dv_stride.t;
    for (int64_t c = 0; c < nk; ++c)
      for (int64_t d = 0; d < D; ++d) {
        dkj[c * p.dk_stride.t + d] = dk_acc[c * D + d];
        dvj[c * p.dv_stride.t + d] = dv_acc[c * D + d];
      }
  }
}

