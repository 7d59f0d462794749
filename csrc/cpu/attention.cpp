// Attention over the KV cache. Decode: every KV head's group of queries reads the cache once,
// split over parts of the key range on the thread pool, and merged part by part. Prompts:
// blocks of queries (a KV group's heads together) against their visible keys, tile by tile
// with the online softmax (flash-style).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/kernels.h"
#include "cpu/quant.h"
#include "cpu/simd.h"
#include "runtime/threadpool.h"

namespace gemma {
using simd::VecF;

namespace {

// Rows prefetched ahead of the one being read: the cache streams from memory at long contexts,
// and the hardware prefetchers alone left the kernels at a third of the read bandwidth
// (measured on a 4096-key layer: 1.07 ms without, 0.63 ms with 8 rows ahead, 2 threads).
constexpr int64_t kRowsAhead = 8;
// Prompt attention reads the keys and values in tiles of this many slots (64 KiB of float32
// keys at head_dim 256: they stay in L2 while a task's query rows pass over them).
constexpr int64_t kKeyTile = 64;

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

// Scores of GQ queries (rows of q, hd apart) against JK keys (rows of k, ldk apart): the
// GQ x JK dot products share every loaded vector (a query's with JK keys, a key's with GQ
// queries); one accumulator each, summed over its lanes at the end, the tail in scalars.
template <typename KT, int GQ, int JK>
inline void score_tile(const float* q, int64_t hd, const KT* k, int64_t ldk, float* s, int64_t lds) {
  constexpr int N = VecF::N;
  VecF acc[GQ][JK];
  for (int g = 0; g < GQ; ++g)
    for (int j = 0; j < JK; ++j) acc[g][j] = VecF::zero();
  int64_t d = 0;
  for (; d + N <= hd; d += N) {
    VecF kv[JK];
    for (int j = 0; j < JK; ++j) kv[j] = VecF::load(k + j * ldk + d);
    for (int g = 0; g < GQ; ++g) {
      const VecF qv = VecF::load(q + g * hd + d);
      for (int j = 0; j < JK; ++j) acc[g][j] = simd::fma(qv, kv[j], acc[g][j]);
    }
  }
  for (int g = 0; g < GQ; ++g)
    for (int j = 0; j < JK; ++j) {
      float t = simd::hsum(acc[g][j]);
      for (int64_t e = d; e < hd; ++e) t += q[g * hd + e] * load_scalar(k + j * ldk + e);
      s[g * lds + j] = t;
    }
}

template <typename KT, int GQ>
void scores_rows(const float* q, int64_t hd, const KT* k, int64_t ldk, int64_t n, float* s, int64_t lds) {
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    for (int64_t a = j + kRowsAhead; a < std::min(n, j + kRowsAhead + 2); ++a) prefetch_row(k + a * ldk, ldk);
    score_tile<KT, GQ, 2>(q, hd, k + j * ldk, ldk, s + j, lds);
  }
  if (j < n) score_tile<KT, GQ, 1>(q, hd, k + j * ldk, ldk, s + j, lds);
}

// s[g][j] = q_g . k_j for G queries and n keys: queries in tiles of up to 4.
template <typename KT>
void scores(const float* q, int64_t G, int64_t hd, const KT* k, int64_t ldk, int64_t n, float* s) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) scores_rows<KT, 4>(q + g * hd, hd, k, ldk, n, s + g * n, n);
  switch (G - g) {
    case 3: scores_rows<KT, 3>(q + g * hd, hd, k, ldk, n, s + g * n, n); break;
    case 2: scores_rows<KT, 2>(q + g * hd, hd, k, ldk, n, s + g * n, n); break;
    case 1: scores_rows<KT, 1>(q + g * hd, hd, k, ldk, n, s + g * n, n); break;
    default: break;
  }
}

// P . V over the visible value rows idx[i0..i1) for GQ query rows (p rows n apart):
// sum_i p[g][idx[i]] v_idx[i], each loaded value vector shared by the GQ rows, the sums of DV
// vectors per row held in registers across the rows; stored to out[g] (Add: added to it).
template <typename VT, int GQ, bool Add>
void pv_rows(const float* p, int64_t n, const int32_t* idx, int64_t i0, int64_t i1, const VT* v, int64_t ldv,
             int64_t hd, float* out) {
  constexpr int N = VecF::N, DV = 2;
  int64_t d = 0;
  for (; d + DV * N <= hd; d += DV * N) {
    VecF acc[GQ][DV];
    for (int g = 0; g < GQ; ++g)
      for (int e = 0; e < DV; ++e) acc[g][e] = VecF::zero();
    for (int64_t i = i0; i < i1; ++i) {
      const VT* vr = v + idx[i] * ldv + d;
      VecF vv[DV];
      for (int e = 0; e < DV; ++e) vv[e] = VecF::load(vr + e * N);
      for (int g = 0; g < GQ; ++g) {
        const VecF pg = VecF::set1(p[g * n + idx[i]]);
        for (int e = 0; e < DV; ++e) acc[g][e] = simd::fma(pg, vv[e], acc[g][e]);
      }
    }
    for (int g = 0; g < GQ; ++g)
      for (int e = 0; e < DV; ++e) {
        float* at = out + g * hd + d + e * N;
        (Add ? simd::add(VecF::load(at), acc[g][e]) : acc[g][e]).store(at);
      }
  }
  for (; d < hd; ++d)
    for (int g = 0; g < GQ; ++g) {
      float a = 0.f;
      for (int64_t i = i0; i < i1; ++i) a += p[g * n + idx[i]] * load_scalar(v + idx[i] * ldv + d);
      out[g * hd + d] = Add ? out[g * hd + d] + a : a;
    }
}

// o[g] = sum_i p[g][idx[i]] v_idx[i] for GQ queries (p rows n apart, o rows hd apart), over
// the visible value rows only (a masked slot may hold anything). The rows go in sub-tiles of
// 16 KiB (they stay in L1, the next sub-tile's prefetched meanwhile); per sub-tile the GQ
// sums stay in registers over its rows and are added to o once.
template <typename VT, int GQ>
void weighted_sum(const float* p, int64_t n, const int32_t* idx, int64_t m, const VT* v, int64_t ldv, int64_t hd,
                  float* o) {
  const int64_t sub = std::max<int64_t>(4, 16384 / (hd * static_cast<int64_t>(sizeof(VT))));
  std::fill(o, o + GQ * hd, 0.f);
  for (int64_t i0 = 0; i0 < m; i0 += sub) {
    const int64_t i1 = std::min(m, i0 + sub);
    for (int64_t i = i1; i < std::min(m, i1 + sub); ++i) prefetch_row(v + idx[i] * ldv, hd);
    pv_rows<VT, GQ, true>(p, n, idx, i0, i1, v, ldv, hd, o);
  }
}

template <typename VT>
void weighted_sums(const float* p, int64_t G, int64_t n, const int32_t* idx, int64_t m, const VT* v, int64_t ldv,
                   int64_t hd, float* o) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) weighted_sum<VT, 4>(p + g * n, n, idx, m, v, ldv, hd, o + g * hd);
  switch (G - g) {
    case 3: weighted_sum<VT, 3>(p + g * n, n, idx, m, v, ldv, hd, o + g * hd); break;
    case 2: weighted_sum<VT, 2>(p + g * n, n, idx, m, v, ldv, hd, o + g * hd); break;
    case 1: weighted_sum<VT, 1>(p + g * n, n, idx, m, v, ldv, hd, o + g * hd); break;
    default: break;
  }
}

template <typename KT>
void partial_typed(const float* q, int64_t G, int64_t hd, const KT* k, int64_t ldk, const KT* v, int64_t ldv,
                   const uint8_t* valid, int64_t n, float scale, float cap, float* s, float* m, float* l, float* o) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  thread_local std::vector<int32_t> idx;
  idx.clear();
  for (int64_t j = 0; j < n; ++j)
    if (valid[j]) idx.push_back(static_cast<int32_t>(j));
  const int64_t visible = static_cast<int64_t>(idx.size());
  if (visible == 0) {  // nothing visible in this part
    std::fill(m, m + G, kNegInf);
    std::fill(l, l + G, 0.f);
    std::fill(o, o + G * hd, 0.f);
    return;
  }
  // Scores: each key row is read once, for all G queries of its group.
  scores(q, G, hd, k, ldk, n, s);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * n;
    float mg = kNegInf;
    for (int64_t j = 0; j < n; ++j) {
      float x = sg[j] * scale;
      if (cap > 0.f) x = std::tanh(x / cap) * cap;
      sg[j] = valid[j] ? x : kNegInf;
      mg = std::max(mg, sg[j]);
    }
    m[g] = mg;
    for (int64_t j = 0; j < n; ++j) sg[j] -= mg;
    exp_inplace(sg, n);
    float sum = 0.f;
    for (int64_t i = 0; i < visible; ++i) sum += sg[idx[i]];
    l[g] = sum;
  }
  // P . V over the visible rows: each value row is read once for all G queries.
  weighted_sums(s, G, n, idx.data(), visible, v, ldv, hd, o);
}

// An int8 cache's rows (plain Q8_0 rows of w) as their values d * q, exact in float32: dst
// [w.rows, w.cols].
void dequantize_rows(const Weight& w, float* dst) {
  const int64_t nb = w.cols / kQBlock;
  for (int64_t i = 0; i < w.rows; ++i)
    dequantize_row(DType::Int8, static_cast<const uint8_t*>(w.data) + i * w.ld, w.scales + i * nb, nullptr, w.cols,
                   dst + i * w.cols);
}

// The rows of w as float32: w itself, or an int8 cache's rows dequantized into buf.
Weight float_rows(const Weight& w, std::vector<float>& buf) {
  if (w.dtype != DType::Int8) return w;
  if (static_cast<int64_t>(buf.size()) < w.rows * w.cols) buf.resize(static_cast<size_t>(w.rows * w.cols));
  dequantize_rows(w, buf.data());
  Weight f = w;
  f.dtype = DType::F32;
  f.data = buf.data();
  f.scales = nullptr;
  f.ld = w.cols;
  return f;
}

// s[r][j] = q_r . k_j for a key tile (in cache): 4 query rows x 3 keys per register tile.
template <typename KT>
void tile_scores(const float* q, int64_t QR, int64_t hd, const KT* k, int64_t ldk, int64_t n, float* s) {
  int64_t r = 0;
  for (; r + 4 <= QR; r += 4) {
    int64_t j = 0;
    for (; j + 3 <= n; j += 3) score_tile<KT, 4, 3>(q + r * hd, hd, k + j * ldk, ldk, s + r * n + j, n);
    for (; j < n; ++j) score_tile<KT, 4, 1>(q + r * hd, hd, k + j * ldk, ldk, s + r * n + j, n);
  }
  for (; r < QR; ++r)
    for (int64_t j = 0; j < n; ++j) score_tile<KT, 1, 1>(q + r * hd, hd, k + j * ldk, ldk, s + r * n + j, n);
}

// P . V of a key tile for GQ query rows over its visible rows idx[0..m): ot[g].
template <typename VT, int GQ>
void pv_tile(const float* p, int64_t n, const int32_t* idx, int64_t m, const VT* v, int64_t ldv, int64_t hd, float* ot) {
  pv_rows<VT, GQ, false>(p, n, idx, 0, m, v, ldv, hd, ot);
}

// Prompt attention of one task, flash-style: QR query rows (row g * nq + i at slot
// first_q + i) against the keys [lo, hi) (k, v: their rows, ld apart) in tiles of kKeyTile,
// keeping per row the running maximum m, sum l and unnormalised output o; each tile's keys
// and values are read once for all QR rows. Leaves o and l (o / l is the result).
template <typename KT>
void prefill_block(const float* qblock, int64_t QR, int64_t nq, int64_t hd, const KT* k, const KT* v, int64_t ld,
                   const uint8_t* valid, int64_t lo, int64_t hi, int64_t first_q, const AttentionRule& rule,
                   float* sc, float* o, float* ot, float* m, float* l, float* c) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  thread_local std::vector<int32_t> tl_idx;
  std::vector<int32_t>& idx = tl_idx;
  std::fill(m, m + QR, kNegInf);
  std::fill(l, l + QR, 0.f);
  std::fill(o, o + QR * hd, 0.f);
  const int64_t window = rule.window;
  for (int64_t k0 = lo; k0 < hi; k0 += kKeyTile) {
    const int64_t kn = std::min(kKeyTile, hi - k0);
    idx.clear();
    for (int64_t j = 0; j < kn; ++j)
      if (valid[k0 + j]) idx.push_back(static_cast<int32_t>(j));
    if (idx.empty()) continue;
    tile_scores(qblock, QR, hd, k + (k0 - lo) * ld, ld, kn, sc);
    for (int64_t qr = 0; qr < QR; ++qr) {
      const int64_t qs = first_q + qr % nq;
      // The keys this query sees in the tile: [j0, j1] in slots.
      int64_t j0 = k0, j1 = rule.causal ? std::min(qs, k0 + kn - 1) : k0 + kn - 1;
      if (window > 0) {
        j0 = std::max(j0, qs - window + 1);
        if (!rule.causal) j1 = std::min(j1, qs + window - 1);
      }
      float* s = sc + qr * kn;
      float mt = kNegInf;
      for (int64_t j = 0; j < kn; ++j) {
        const int64_t slot = k0 + j;
        float x = s[j] * rule.scale;
        if (rule.softcap > 0.f) x = std::tanh(x / rule.softcap) * rule.softcap;
        s[j] = slot >= j0 && slot <= j1 && valid[slot] ? x : kNegInf;
        mt = std::max(mt, s[j]);
      }
      const float mn = std::max(m[qr], mt);
      if (mn == kNegInf) {  // nothing visible yet
        std::fill(s, s + kn, 0.f);
        c[qr] = 1.f;
        continue;
      }
      c[qr] = std::exp(m[qr] - mn);  // 0 when m was -inf
      m[qr] = mn;
      for (int64_t j = 0; j < kn; ++j) s[j] -= mn;
      exp_inplace(s, kn);
      float sum = 0.f;
      for (int64_t j = 0; j < kn; ++j) {
        const int64_t slot = k0 + j;
        if (!(slot >= j0 && slot <= j1 && valid[slot])) s[j] = 0.f;  // the vector exp stops at e^-87
        sum += s[j];
      }
      l[qr] = l[qr] * c[qr] + sum;
    }
    const int64_t n_idx = static_cast<int64_t>(idx.size());
    const KT* vt = v + (k0 - lo) * ld;
    int64_t g = 0;
    for (; g + 4 <= QR; g += 4) pv_tile<KT, 4>(sc + g * kn, kn, idx.data(), n_idx, vt, ld, hd, ot + g * hd);
    for (; g < QR; ++g) pv_tile<KT, 1>(sc + g * kn, kn, idx.data(), n_idx, vt, ld, hd, ot + g * hd);
    for (int64_t qr = 0; qr < QR; ++qr) {
      const VecF cv = VecF::set1(c[qr]);
      float* orow = o + qr * hd;
      const float* trow = ot + qr * hd;
      int64_t d = 0;
      for (; d + VecF::N <= hd; d += VecF::N)
        simd::fma(VecF::load(orow + d), cv, VecF::load(trow + d)).store(orow + d);
      for (; d < hd; ++d) orow[d] = orow[d] * c[qr] + trow[d];
    }
  }
}

}  // namespace

void attention_partial(const float* q, int64_t G, const Weight& k_in, const Weight& v_in, const uint8_t* valid,
                       int64_t n, float scale, float cap, float* scratch, float* m, float* l, float* o) {
  thread_local std::vector<float> kf, vf;
  const Weight k = float_rows(k_in, kf), v = float_rows(v_in, vf);  // an int8 part: its values
  const int64_t hd = k.cols;
  if (k.dtype == DType::F32)
    partial_typed(q, G, hd, static_cast<const float*>(k.data), k.ld, static_cast<const float*>(v.data), v.ld, valid,
                  n, scale, cap, scratch, m, l, o);
  else
    partial_typed(q, G, hd, static_cast<const uint16_t*>(k.data), k.ld, static_cast<const uint16_t*>(v.data), v.ld,
                  valid, n, scale, cap, scratch, m, l, o);
}

void attention_merge(const float* m, const float* l, const float* o, int64_t parts, int64_t stride, int64_t hd,
                     float* out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float mx = kNegInf;
  for (int64_t c = 0; c < parts; ++c) mx = std::max(mx, m[c * stride]);
  std::fill(out, out + hd, 0.f);
  if (mx == kNegInf) return;  // nothing visible (padding)
  float sum = 0.f;
  for (int64_t c = 0; c < parts; ++c) {
    if (m[c * stride] == kNegInf) continue;
    const float w = std::exp(m[c * stride] - mx);
    sum += w * l[c * stride];
    const float* oc = o + c * stride * hd;
    for (int64_t d = 0; d < hd; ++d) out[d] += w * oc[d];
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < hd; ++d) out[d] *= inv;
}

void attention_decode(const float* q, int64_t R, const int64_t* rows, const int64_t* slots, const KVLayerView& kv,
                      const AttentionRule& rule, float* out, std::vector<float>& scratch) {
  const int64_t nH = rule.n_heads, nKV = kv.kv_heads, hd = kv.head_dim, G = nH / nKV, q_stride = nH * hd;
  // Per row: its first visible slot, its number of keys, and where its parts start (kept per
  // thread: this runs once per layer and token).
  // (Named through references: a lambda that named the thread_local itself would read the
  // pool worker's own, empty, copy.)
  thread_local std::vector<int64_t> tl_lo, tl_n_keys, tl_first;
  std::vector<int64_t>& lo = tl_lo;
  std::vector<int64_t>& n_keys = tl_n_keys;
  std::vector<int64_t>& first = tl_first;
  lo.resize(R);
  n_keys.resize(R);
  first.assign(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    lo[r] = rule.window > 0 ? std::max<int64_t>(0, slots[r] - rule.window + 1) : 0;
    n_keys[r] = slots[r] + 1 - lo[r];
    first[r + 1] = first[r] + nKV * ((n_keys[r] + kDecodeKeyPart - 1) / kDecodeKeyPart);
  }
  // The parts' results: m and l [part][G], o [part][G][hd]; a row's parts run over its KV
  // heads, then its key parts.
  const int64_t parts = first[R];
  if (static_cast<int64_t>(scratch.size()) < parts * G * (hd + 2)) scratch.resize(static_cast<size_t>(parts * G * (hd + 2)));
  float *pm = scratch.data(), *pl = pm + parts * G, *po = pl + parts * G;
  parallel_for(parts, [&](int64_t a, int64_t b) {
    thread_local std::vector<float> scores;
    if (static_cast<int64_t>(scores.size()) < G * kDecodeKeyPart) scores.resize(static_cast<size_t>(G * kDecodeKeyPart));
    int64_t r = std::upper_bound(first.begin(), first.end(), a) - first.begin() - 1;
    for (int64_t task = a; task < b; ++task) {
      while (task >= first[r + 1]) ++r;
      const int64_t P = (first[r + 1] - first[r]) / nKV, kvh = (task - first[r]) / P, p = (task - first[r]) % P;
      const int64_t j0 = lo[r] + p * kDecodeKeyPart, n = std::min(kDecodeKeyPart, lo[r] + n_keys[r] - j0);
      attention_partial(q + r * q_stride + kvh * G * hd, G, kv.keys(rows[r], kvh, j0, n), kv.values(rows[r], kvh, j0, n),
                        kv.valid + rows[r] * kv.capacity + j0, n, rule.scale, rule.softcap, scores.data(),
                        pm + task * G, pl + task * G, po + task * G * hd);
    }
  });
  auto merge = [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) {
      const int64_t h = task % nH, r = task / nH, kvh = h / G, P = (first[r + 1] - first[r]) / nKV;
      const int64_t at = (first[r] + kvh * P) * G + h % G;  // this query head's part 0
      attention_merge(pm + at, pl + at, po + at * hd, P, G, hd, out + r * q_stride + h * hd);
    }
  };
  // The merge reads every part's output once: on the calling thread unless that is a lot
  // (a pass of the pool costs tens of microseconds). Either way each query's arithmetic is
  // the same.
  if (parts * G * hd < (int64_t{1} << 18))
    merge(0, R * nH);
  else
    parallel_for(R * nH, merge);
}

void attention_prefill(const float* q, int64_t R, const int64_t* rows, int64_t slot0, int64_t T,
                       const KVLayerView& kv_in, const AttentionRule& rule, float* out, std::vector<float>& scratch) {
  constexpr int64_t kQB = 16;
  const int64_t nH = rule.n_heads, hd = kv_in.head_dim, group = nH / kv_in.kv_heads;
  const int64_t q_stride = nH * hd;
  const int64_t end_slot = slot0 + T;  // slots [0, end_slot) hold this row's tokens now
  const int64_t window = rule.window;
  const int64_t QBn = (T + kQB - 1) / kQB;
  const float scale = rule.scale, cap = rule.softcap;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // An int8 cache: the slots this call reads, [first, end_slot) of the rows it reads, as float32
  // once (every query block of a row reads most of them).
  KVLayerView kv = kv_in;
  if (kv_in.dtype == DType::Int8) {
    // Every row of a prompt chunk holds [slot0 - window + 1, end_slot) at least.
    int64_t first = window > 0 ? slot0 - window + 1 : 0, n_rows = 0;
    for (int64_t r = 0; r < R; ++r) {
      first = std::max(first, kv_in.origin_of(rows[r]));
      n_rows = std::max(n_rows, rows[r] + 1);
    }
    const int64_t n = end_slot - first, per_row = kv_in.kv_heads * n * hd;
    if (static_cast<int64_t>(scratch.size()) < 2 * n_rows * per_row) scratch.resize(static_cast<size_t>(2 * n_rows * per_row));
    float* kf = scratch.data();
    float* vf = kf + n_rows * per_row;
    parallel_for(R * kv_in.kv_heads, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        const int64_t row = rows[t / kv_in.kv_heads], h = t % kv_in.kv_heads;
        dequantize_rows(kv_in.keys(row, h, first, n), kf + (row * kv_in.kv_heads + h) * n * hd);
        dequantize_rows(kv_in.values(row, h, first, n), vf + (row * kv_in.kv_heads + h) * n * hd);
      }
    });
    kv.dtype = DType::F32;
    kv.k = kf;
    kv.v = vf;
    kv.k_scales = kv.v_scales = nullptr;
    kv.span = n;
    kv.origin = first;
    kv.origins = nullptr;
  }
  // Tasks: (row, heads, query block). All the heads of a KV group go in one task, so that each
  // key and value tile is read once for the group, unless that leaves the pool too few tasks
  // (a short chunk): then one head per task.
  const int64_t hpt = R * kv.kv_heads * QBn >= 2 * num_threads() ? group : 1, HT = nH / hpt;
  parallel_for(R * HT * QBn, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; ++task) {
      const int64_t qb = task % QBn, ht = (task / QBn) % HT, r = task / (QBn * HT);
      const int64_t t0 = qb * kQB, nq = std::min(kQB, T - t0);
      const int64_t row = rows[r], h0 = ht * hpt, kvh = h0 / group;
      // Keys [lo, hi): up to the last query's limit and from the first query's window on;
      // each query masks the rest of the range.
      const int64_t first_q = slot0 + t0, last_q = slot0 + t0 + nq - 1;
      int64_t hi = rule.causal ? last_q + 1 : end_slot;
      int64_t lo = 0;
      if (window > 0) {
        lo = std::max<int64_t>(0, first_q - window + 1);
        if (!rule.causal) hi = std::min(hi, last_q + window);
      }
      // Query rows g-major: row g * nq + i is head h0 + g at position t0 + i.
      const Weight K = kv.keys(row, kvh, lo, hi - lo), V = kv.values(row, kvh, lo, hi - lo);
      thread_local std::vector<float> tl_buf;
      std::vector<float>& buf = tl_buf;
      const int64_t QR = hpt * nq;
      if (static_cast<int64_t>(buf.size()) < QR * (3 * hd + kKeyTile + 3))
        buf.resize(static_cast<size_t>(QR * (3 * hd + kKeyTile + 3)));
      float* qblock = buf.data();
      float* o = qblock + QR * hd;
      float* ot = o + QR * hd;
      float* sc = ot + QR * hd;
      float* m = sc + QR * kKeyTile;
      float* l = m + QR;
      float* c = l + QR;
      for (int64_t g = 0; g < hpt; ++g)
        for (int64_t i = 0; i < nq; ++i)
          std::memcpy(qblock + (g * nq + i) * hd, q + (r * T + t0 + i) * q_stride + (h0 + g) * hd, hd * sizeof(float));
      if (K.dtype == DType::F32)
        prefill_block(qblock, QR, nq, hd, static_cast<const float*>(K.data), static_cast<const float*>(V.data), K.ld,
                      kv.valid + row * kv.capacity, lo, hi, first_q, rule, sc, o, ot, m, l, c);
      else
        prefill_block(qblock, QR, nq, hd, static_cast<const uint16_t*>(K.data), static_cast<const uint16_t*>(V.data),
                      K.ld, kv.valid + row * kv.capacity, lo, hi, first_q, rule, sc, o, ot, m, l, c);
      for (int64_t g = 0; g < hpt; ++g)
        for (int64_t i = 0; i < nq; ++i) {
          float* orow = out + (r * T + t0 + i) * q_stride + (h0 + g) * hd;
          const int64_t qr = g * nq + i;
          const float inv = l[qr] > 0.f ? 1.0f / l[qr] : 0.f;  // nothing visible (padding): zeros
          for (int64_t d = 0; d < hd; ++d) orow[d] = o[qr * hd + d] * inv;
        }
    }
  });
}

}  // namespace gemma
