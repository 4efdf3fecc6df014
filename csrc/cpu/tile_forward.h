// minigpt attention, CPU tile code: the forward (FlashAttention-2, Alg. 1) and the decode path.
// Included by attention_tiles.h, inside one namespace per instruction set, after tile_vec.h.
// ---------------------------------------------------------------------------------------------
// Forward (Alg. 1) for units [u0, u1), unit = (b * Hq + h) * query_tiles + i, with this worker's
// forward_tile_scratch(D) elements at scratch. kD > 0 fixes the head dim at compile time so the
// loops over it have constant trip counts; kD == 0 reads p.D.
// The scores are computed transposed, S^T = K_j Q_i^T (keys x queries), so the online
// softmax runs down columns and every query row's max and sum live in one vector lane: no
// horizontal reductions. The scale is applied exactly as the backward applies it when it
// rebuilds P from lse (s * scale - lse), so that both passes round the scores alike. O~ += P V_j then reads P^T through the transposed A layout.
// Copies rows [r0, r1) of D elements, ld apart, from src to dst (row r at dst + r * D), and
// asks for the rows up to `ahead` (exclusive; ahead >= r1) to be fetched into cache a few rows
// before they are copied. Rows a power of two apart in memory defeat the hardware prefetcher,
// which stops at 4 KiB page boundaries: the model's layout puts two rows of a head on a page
// (H * D = 512 floats apart for H = 8, D = 64).
template <typename T>
MINIGPT_INLINE void pack_rows(const T* src, int64_t ld, int64_t r0, int64_t r1, int64_t ahead,
                              int64_t D, T* dst) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  constexpr int64_t kDistance = 8;           // rows
  for (int64_t r = r0; r < r1; ++r) {
    if (r + kDistance < ahead)
      for (int64_t d = 0; d < D; d += kLine) __builtin_prefetch(src + (r + kDistance) * ld + d);
    std::copy(src + r * ld, src + r * ld + D, dst + r * D);
  }
}

template <typename T, typename LseT, int kD>
MINIGPT_INLINE void forward_units(const AttentionParams& p, T* out, const Strides4& os, LseT* lse,
                                  T* scratch, int64_t u0, int64_t u1) {
  constexpr int W = kLanes<T>;
  const int64_t D = kD > 0 ? kD : p.D;
  const int64_t G = p.group_size();
  const int64_t query_tiles = ceil_div(p.Tq, kBlockQ);
  const T scale = softmax_scale<T>(p);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  std::fill(scratch, scratch + forward_tile_scratch(D), T(0));
  T* qt = scratch;                  // (D, kBlockQ): Q_i^T, zero-padded columns
  T* st = qt + D * kBlockQ;         // (kBlockK, kBlockQ): S^T, then P~^T in place
  T* acc = st + kBlockK * kBlockQ;  // (kBlockQ, D): O~
  T* row_max = acc + kBlockQ * D;
  T* row_sum = row_max + kBlockQ;
  T* rescale = row_sum + kBlockQ;
  // K and V rows in the model's layout, (B, T, H, D) viewed as (B, H, T, D), lie H * D elements
  // apart, a power of two: a tile's rows then share a few L1 sets and evict each other, and the
  // hardware prefetcher does not follow them. With such strides, the kv head's rows are copied
  // side by side (forward_head_scratch) as the units reach them, once per kv head per worker:
  // this worker's units run through the query tiles of a head in order, and each reads the head's
  // keys again, so the copy costs one read of K and V, and every tile product reads contiguous
  // rows.
  const bool pack = packs_kv(p);
  T* k_head = scratch + forward_tile_scratch(D);  // (Tk, D), rows [key_begin, packed_end) valid
  T* v_head = k_head + (pack ? p.Tk * D : 0);     // (Tk, D)
  int64_t packed_pair = -1, packed_end = 0;

  for (int64_t u = u0; u < u1; ++u) {
    const int64_t i = u % query_tiles;
    const int64_t h = (u / query_tiles) % p.Hq;
    const int64_t b = u / (query_tiles * p.Hq);
    const int64_t r0 = i * kBlockQ;
    const int64_t nr = std::min(kBlockQ, p.Tq - r0);
    const int64_t nr_pad = round_up(nr, W);  // query columns of S^T, whole vectors
    const T* qi = q + b * p.q_stride.b + h * p.q_stride.h + r0 * p.q_stride.t;
    const T* kh = k + b * p.k_stride.b + (h / G) * p.k_stride.h;
    const T* vh = v + b * p.v_stride.b + (h / G) * p.v_stride.h;

    // Row by row: each source row is read once, whole. (Column by column, the model's layout
    // would keep 64 rows H * D elements apart in flight, more than L1's ways hold.)
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t d = 0; d < D; ++d) qt[d * kBlockQ + r] = qi[r * p.q_stride.t + d];
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = nr; r < nr_pad; ++r) qt[d * kBlockQ + r] = T(0);
    std::fill(row_max, row_max + nr_pad, neg_inf);
    std::fill(row_sum, row_sum + nr_pad, T(0));
    std::fill(acc, acc + nr * D, T(0));

    // Keys [key_begin, key_end) are visible to some row of the tile: with a window, the key
    // tiles before the first row's window are never visited, so the cost is ~ Tq * window.
    const int64_t key_end = visible_key_end(p, r0, nr);
    const int64_t key_begin = p.first_key(r0);
    const bool alibi = p.alibi_slopes != nullptr;
    const T slope = alibi ? static_cast<T>(p.alibi_slopes[h]) : T(0);
    const Vec<T> score_scale = vset(alibi ? T(1) : scale);  // ALiBi tiles come scaled
    if (pack && b * p.Hkv + h / G != packed_pair) {
      packed_pair = b * p.Hkv + h / G;
      packed_end = key_begin;  // later units of this head start at key_begin or after it
    }
    for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, key_end - j0);
      const T* kj = kh + j0 * p.k_stride.t;
      const T* vj = vh + j0 * p.v_stride.t;
      int64_t ldk = p.k_stride.t, ldv = p.v_stride.t;
      if (pack) {
        if (j0 + nk > packed_end) {
          const int64_t from = std::max(packed_end, j0);
          pack_rows(kh, p.k_stride.t, from, j0 + nk, key_end, D, k_head);
          pack_rows(vh, p.v_stride.t, from, j0 + nk, key_end, D, v_head);
          packed_end = j0 + nk;
        }
        kj = k_head + j0 * D;
        vj = v_head + j0 * D;
        ldk = ldv = D;
      }
      gemm<T, ALayout::RowMajor>(nk, nr_pad, D, kj, ldk, qt, kBlockQ, st, kBlockQ, false);
      if (alibi) {
        for (int64_t kk = 0; kk < nk; ++kk)
          for (int64_t r = 0; r < nr_pad; ++r)
            st[kk * kBlockQ + r] = alibi_score(st[kk * kBlockQ + r], scale, slope,
                                               r0 + r + p.causal_offset() - j0 - kk);
      }
      // Causal mask, only on tiles that cross the diagonal: key j0 + kk is visible to query
      // r0 + r iff r >= j0 + kk - offset - r0.
      if (p.causal && j0 + nk - 1 > r0 + p.causal_offset()) {
        for (int64_t kk = 0; kk < nk; ++kk) {
          const int64_t first_visible = std::clamp<int64_t>(j0 + kk - p.causal_offset() - r0, 0,
                                                            nr_pad);
          std::fill(st + kk * kBlockQ, st + kk * kBlockQ + first_visible, neg_inf);
        }
      }
      // Window mask, only on tiles that start before the last row's window: key j0 + kk is
      // hidden from query r0 + r iff r >= j0 + kk - offset + window - r0.
      if (p.window > 0 && j0 < p.first_key(r0 + nr - 1)) {
        for (int64_t kk = 0; kk < nk; ++kk) {
          const int64_t first_hidden = std::clamp<int64_t>(
              j0 + kk - p.causal_offset() + p.window - r0, 0, nr_pad);
          std::fill(st + kk * kBlockQ + first_hidden, st + kk * kBlockQ + nr_pad, neg_inf);
        }
      }
      for (int64_t c = 0; c < nr_pad; c += W) {
        const Vec<T> m_old = vload(row_max + c);
        Vec<T> m_new = m_old;
        for (int64_t kk = 0; kk < nk; ++kk)
          m_new = vmax(m_new, vload(st + kk * kBlockQ + c) * score_scale);
        // A row that has seen only masked keys keeps m = -inf; subtracting 0 instead of -inf
        // keeps its probabilities at exp(-inf) = 0 rather than NaN.
        const Vec<T> m_safe = m_new == neg_inf ? Vec<T>{} : m_new;
        const Vec<T> alpha = vexp(m_old - m_safe);
        Vec<T> sum{};
        for (int64_t kk = 0; kk < nk; ++kk) {
          const Vec<T> pk = vexp(vload(st + kk * kBlockQ + c) * score_scale - m_safe);
          vstore(st + kk * kBlockQ + c, pk);
          sum += pk;
        }
        vstore(row_sum + c, alpha * vload(row_sum + c) + sum);
        vstore(row_max + c, m_new);
        vstore(rescale + c, alpha);
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= rescale[r];
      gemm<T, ALayout::Transposed>(nr, D, nk, st, kBlockQ, vj, ldv, acc, D, true);
    }

    T* oi = out + b * os.b + h * os.h + r0 * os.t;
    LseT* lse_i = lse + (b * p.Hq + h) * p.Tq + r0;
    for (int64_t r = 0; r < nr; ++r) {
      // l == 0 only for a row with no visible key: define its output as 0 and its lse as -inf.
      const T l = row_sum[r];
      const T inv = l > T(0) ? T(1) / l : T(0);
      for (int64_t d = 0; d < D; ++d) oi[r * os.t + d] = acc[r * D + d] * inv;
      lse_i[r] = static_cast<LseT>(l > T(0) ? row_max[r] + std::log(l) : neg_inf);
    }
  }
}

// sum_lanes(a)[i] = the sum of the lanes of a[i]: W vectors reduced to one in log2(W) rounds of
// pairwise shuffles and adds (the transpose-and-add of a horizontal reduction), instead of W
// separate horizontal sums. In the round with blocks of B lanes, two vectors x, y become one whose
// lane groups of 2B hold x's blocks summed pairwise in the first B lanes and y's in the last B:
// after the last round lane i holds a[i]'s sum. Compilers without __builtin_shufflevector
// (GCC < 12) sum lane by lane.
#ifdef MINIGPT_HAVE_SHUFFLEVECTOR
// Shuffle index of lane `lane` in the round with blocks of `block` lanes, vectors of `lanes`
// lanes; `partner` 0 picks the first addend, `block` the second.
constexpr int sum_lanes_index(int lanes, int block, int lane, int partner) {
  const int base = lane / (2 * block) * 2 * block, g = lane % (2 * block);
  return g < block ? base + g + partner : lanes + base + g - block + partner;
}
template <int Block, typename V, std::size_t... I>
MINIGPT_INLINE V sum_lanes_pair(V x, V y, std::index_sequence<I...>) {
  constexpr int n = sizeof...(I);
  return __builtin_shufflevector(x, y, sum_lanes_index(n, Block, I, 0)...) +
         __builtin_shufflevector(x, y, sum_lanes_index(n, Block, I, Block)...);
}
template <typename T, int Block>
MINIGPT_INLINE void sum_lanes_round(Vec<T>* s) {
  constexpr int W = kLanes<T>;
  for (int i = 0; i < W / Block / 2; ++i)
    s[i] = sum_lanes_pair<Block>(s[2 * i], s[2 * i + 1], std::make_index_sequence<W>{});
  if constexpr (2 * Block < W) sum_lanes_round<T, 2 * Block>(s);
}
#endif

template <typename T>
MINIGPT_INLINE Vec<T> sum_lanes(const Vec<T> (&a)[kLanes<T>]) {
#ifdef MINIGPT_HAVE_SHUFFLEVECTOR
  Vec<T> s[kLanes<T>];
  for (int i = 0; i < kLanes<T>; ++i) s[i] = a[i];
  sum_lanes_round<T, 1>(s);
  return s[0];
#else
  Vec<T> r;
  for (int i = 0; i < kLanes<T>; ++i) {
    T s = 0;
    for (int l = 0; l < kLanes<T>; ++l) s += a[i][l];
    r[i] = s;
  }
  return r;
#endif
}

template <typename T>
MINIGPT_INLINE T max_lane(Vec<T> v) {
  T m = v[0];
  for (int i = 1; i < kLanes<T>; ++i) m = std::max(m, v[i]);
  return m;
}

// s[0 .. n) = scale * (q . k_j) for the keys j = 0 .. n of a tile (key j at k + j * ldk), in
// groups of W keys; lanes past n in the last group are -inf. The last group reads key n - 1 in
// place of the missing keys, so nothing past the tile is touched.
template <typename T, int kD>
MINIGPT_INLINE void decode_scores(int64_t D, const T* q, const T* k, int64_t ldk, int64_t n,
                                  T scale, T* s) {
  constexpr int W = kLanes<T>;
  const int64_t nvec = D / W;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    Vec<T> acc[W];
    for (int i = 0; i < W; ++i) {
      const T* kj = k + std::min<int64_t>(j0 + i, n - 1) * ldk;
      Vec<T> a{};
      if constexpr (kD > 0) {
        for (int64_t d = 0; d < kD / W; ++d) a += vload(q + d * W) * vload(kj + d * W);
      } else {
        for (int64_t d = 0; d < nvec; ++d) a += vload(q + d * W) * vload(kj + d * W);
        for (int64_t d = nvec * W; d < D; ++d) a[0] += q[d] * kj[d];  // D % W leftovers
      }
      acc[i] = a;
    }
    Vec<T> sv = sum_lanes<T>(acc) * scale;
    for (int i = 0; i < W; ++i)
      if (j0 + i >= n) sv[i] = neg_inf;
    vstore(s + j0, sv);
  }
}

// acc[0 .. D) = alpha * acc + sum_j p[j] v_j over the keys j = 0 .. n of a tile (key j at
// v + j * ldv).
template <typename T, int kD>
MINIGPT_INLINE void decode_accumulate(int64_t D, const T* p, const T* v, int64_t ldv, int64_t n,
                                      T alpha, T* acc) {
  constexpr int W = kLanes<T>;
  if constexpr (kD > 0) {
    Vec<T> o[kD / W];  // the row's output lives in registers across the tile's keys
    for (int d = 0; d < kD / W; ++d) o[d] = vload(acc + d * W) * alpha;
    for (int64_t j = 0; j < n; ++j) {
      const T pj = p[j];
      for (int d = 0; d < kD / W; ++d) o[d] += vload(v + j * ldv + d * W) * pj;
    }
    for (int d = 0; d < kD / W; ++d) vstore(acc + d * W, o[d]);
  } else {
    const int64_t nvec = D / W;
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    for (int64_t j = 0; j < n; ++j) {
      const T pj = p[j];
      const T* vj = v + j * ldv;
      for (int64_t d = 0; d < nvec; ++d)
        vstore(acc + d * W, vload(acc + d * W) + vload(vj + d * W) * pj);
      for (int64_t d = nvec * W; d < D; ++d) acc[d] += vj[d] * pj;
    }
  }
}

// Units [u0, u1), unit = (b * Hkv + kvh) * chunks + c, with this worker's decode_tile_scratch
// elements at scratch. With one chunk the rows are finished here (out, lse); otherwise each
// row's (O~, m, l) goes to part_acc / part_stat at index (unit * rows + r) for decode_merge.
template <typename T, typename LseT, int kD>
MINIGPT_INLINE void decode_units(const AttentionParams& p, const DecodeSplit& sp, T* out,
                                 const Strides4& os, LseT* lse, T* part_acc, T* part_stat,
                                 T* scratch, int64_t u0, int64_t u1) {
  constexpr int W = kLanes<T>;
  const int64_t D = kD > 0 ? kD : p.D;
  const int64_t G = p.group_size();
  const int64_t R = sp.rows;
  const T scale = softmax_scale<T>(p);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  T* scores = scratch;                    // (R, kDecodeBlockK): one tile's scores, then P~
  T* acc = scores + R * kDecodeBlockK;    // (R, D): O~
  T* row_max = acc + R * D;               // (R,)
  T* row_sum = row_max + R;               // (R,)

  for (int64_t u = u0; u < u1; ++u) {
    const int64_t c = u % sp.chunks;
    const int64_t pair = u / sp.chunks;
    const int64_t kvh = pair % p.Hkv;
    const int64_t b = pair / p.Hkv;
    const int64_t j_begin = sp.key_begin + c * sp.chunk_len;
    const int64_t j_end = std::min(p.Tk, j_begin + sp.chunk_len);
    const T* kh = k + b * p.k_stride.b + kvh * p.k_stride.h;
    const T* vh = v + b * p.v_stride.b + kvh * p.v_stride.h;
    std::fill(acc, acc + R * D, T(0));
    std::fill(row_max, row_max + R, neg_inf);
    std::fill(row_sum, row_sum + R, T(0));

    for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeBlockK) {
      const int64_t nk = std::min(kDecodeBlockK, j_end - j0);
      const T* kj = kh + j0 * p.k_stride.t;
      const T* vj = vh + j0 * p.v_stride.t;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r / p.Tq, t = r % p.Tq;
        // Query t sees keys first_key(t) <= j <= t + offset: a range of this tile, possibly
        // empty; keys lo .. hi of the tile.
        const int64_t hi =
            p.causal ? std::clamp<int64_t>(t + p.causal_offset() + 1 - j0, 0, nk) : nk;
        const int64_t lo = std::clamp<int64_t>(p.first_key(t) - j0, 0, nk);
        if (hi <= lo) continue;
        const int64_t n = hi - lo;
        const T* qr = q + b * p.q_stride.b + (kvh * G + g) * p.q_stride.h + t * p.q_stride.t;
        T* s = scores + r * kDecodeBlockK;
        decode_scores<T, kD>(D, qr, kj + lo * p.k_stride.t, p.k_stride.t, n, scale, s);
        if (p.alibi_slopes != nullptr) {
          const T slope = static_cast<T>(p.alibi_slopes[kvh * G + g]);
          for (int64_t i = 0; i < n; ++i)
            s[i] -= slope * static_cast<T>(t + p.causal_offset() - (j0 + lo + i));
        }
        const int64_t n_pad = round_up(n, W);
        Vec<T> mv = vload(s);
        for (int64_t i = W; i < n_pad; i += W) mv = vmax(mv, vload(s + i));
        const T m_old = row_max[r];
        const T m_new = std::max(m_old, max_lane<T>(mv));  // finite: n >= 1 visible key
        const T alpha = m_old == neg_inf ? T(0) : std::exp(m_old - m_new);
        Vec<T> sum{};
        for (int64_t i = 0; i < n_pad; i += W) {
          const Vec<T> pv = vexp(vload(s + i) - m_new);  // exp(-inf) = 0 past n
          vstore(s + i, pv);
          sum += pv;
        }
        T l = 0;
        for (int i = 0; i < W; ++i) l += sum[i];
        row_sum[r] = alpha * row_sum[r] + l;
        row_max[r] = m_new;
        decode_accumulate<T, kD>(D, s, vj + lo * p.v_stride.t, p.v_stride.t, n, alpha,
                                 acc + r * D);
      }
    }

    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r / p.Tq, t = r % p.Tq;
      const T* acc_r = acc + r * D;
      if (sp.chunks > 1) {
        T* pa = part_acc + (u * R + r) * D;
        std::copy(acc_r, acc_r + D, pa);
        part_stat[2 * (u * R + r)] = row_max[r];
        part_stat[2 * (u * R + r) + 1] = row_sum[r];
        continue;
      }
      const int64_t h = kvh * G + g;
      const T l = row_sum[r];
      const T inv = l > T(0) ? T(1) / l : T(0);  // no visible key: out 0, lse -inf
      T* o = out + b * os.b + h * os.h + t * os.t;
      for (int64_t d = 0; d < D; ++d) o[d] = acc_r[d] * inv;
      lse[(b * p.Hq + h) * p.Tq + t] =
          static_cast<LseT>(l > T(0) ? row_max[r] + std::log(l) : neg_inf);
    }
  }
}

