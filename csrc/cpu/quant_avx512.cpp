// Quantized matmul kernels for AVX512-VNNI (compiled with -mavx512f -mavx512bw -mavx512vnni;
// called only when the CPU has them). See quant_kernels.h and quant.h.
#include <immintrin.h>

#include <cstring>

#include "cpu/quant.h"
#include "cpu/quant_kernels.h"

namespace gemma {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// sum_b o[b] * xs[b] over n blocks: the offsets' term of one row and token (quant.cpp).
inline float offset_term(const float* o, const float* xs, int64_t n) {
  __m512 c = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= n; b += 16) c = _mm512_fmadd_ps(_mm512_loadu_ps(o + b), _mm512_loadu_ps(xs + b), c);
  if (b < n) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (n - b)) - 1);
    c = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, o + b), _mm512_maskz_loadu_ps(mk, xs + b), c);
  }
  return _mm512_reduce_add_ps(c);
}


// Interleaved groups (quant.h): S groups of 16 rows x RT tokens. Each 64-byte line holds
// the same 4 bytes of 16 rows; one dpbusd with the matching 4 activation bytes broadcast
// adds them into the 16 rows' int32 sums (int8: weights flipped to unsigned with one xor,
// int4/int4m: the low and high nibbles, blocks 2p and 2p + 1 of the pair). Per block the
// 16 scales come in one load, and the offsets' term (w = d q + o: int8 -128 d, int4 -8 d,
// int4m m) is one multiply-add of o with the block's activation sum.
template <bool kInt4, bool kMins, int S, int RT>
void group_kernel(const QWeightView& w, int64_t g, const QActView& a, int64_t t0, float* y, int64_t ldy,
                  bool accumulate) {
  const int64_t nb = w.cols / kQBlock, np = a.np, steps = kInt4 ? np : nb;
  const int64_t gbytes = kQGroup * w.ld, gscales = kQGroup * nb;
  const __m512i low4 = _mm512_set1_epi8(0x0F), c128 = _mm512_set1_epi8(-128);
  __m512 acc[S][RT], off[S][RT];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 4
    for (int t = 0; t < RT; ++t) acc[s][t] = off[s][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < steps; ++b) {
    // The blocks of this step: int8 b; int4 2b and 2b + 1, whose scales read as zeros past a
    // lone last block (masked loads; its activations are zeros too).
    const int64_t blk = kInt4 ? 2 * b : b;
    const __mmask16 second = kInt4 && 2 * b + 1 < nb ? 0xFFFF : 0;
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const uint8_t* src = w.q + (g + s) * gbytes + b * 512;
      // Several groups side by side are several memory streams, and fetching 4 steps ahead
      // keeps each one's next lines in flight (a standalone test here: 4 streams read 23 GB/s
      // without it, 25.5 with it, of a plain read's 29-30).
      if (RT == 1)
#pragma GCC unroll 8
        for (int l = 0; l < 8; ++l) _mm_prefetch(reinterpret_cast<const char*>(src + 2048 + 64 * l), _MM_HINT_T0);
      __m512i d0[RT], d1[RT];
#pragma GCC unroll 4
      for (int t = 0; t < RT; ++t) d0[t] = d1[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        const __m512i v = _mm512_loadu_si512(src + 64 * c);
        if (kInt4) {
          // The high nibbles stay in place: 16 q, taken back by the 1/16 in the block's scale.
          const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_andnot_si512(low4, v);
#pragma GCC unroll 4
          for (int t = 0; t < RT; ++t) {
            const int8_t* x = a.q + (t0 + t) * np * 64 + b * 64 + 4 * c;
            int32_t xl, xh;
            std::memcpy(&xl, x, 4);
            std::memcpy(&xh, x + 32, 4);
            d0[t] = _mm512_dpbusd_epi32(d0[t], lo, _mm512_set1_epi32(xl));
            d1[t] = _mm512_dpbusd_epi32(d1[t], hi, _mm512_set1_epi32(xh));
          }
        } else {
          const __m512i u = _mm512_xor_si512(v, c128);
#pragma GCC unroll 4
          for (int t = 0; t < RT; ++t) {
            int32_t xw;
            std::memcpy(&xw, a.q + (t0 + t) * np * 64 + b * 32 + 4 * c, 4);
            // Two chains for the first token, so one line's dpbusd need not wait for the last.
            if (c % 2 && RT == 1)
              d1[t] = _mm512_dpbusd_epi32(d1[t], u, _mm512_set1_epi32(xw));
            else
              d0[t] = _mm512_dpbusd_epi32(d0[t], u, _mm512_set1_epi32(xw));
          }
        }
      }
      const uint16_t* sc = w.scales + (g + s) * gscales + blk * kQGroup;
      const __m512 dv0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
      const __m512 ov0 = kMins ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                     w.mins + (g + s) * gscales + blk * kQGroup)))
                               : dv0;
      __m512 dv1 = dv0, ov1 = ov0;
      if (kInt4) {
        dv1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(second, sc + kQGroup));
        ov1 = kMins ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(second, w.mins + (g + s) * gscales + (blk + 1) * kQGroup))
                    : dv1;
      }
#pragma GCC unroll 4
      for (int t = 0; t < RT; ++t) {
        const int64_t xi = (t0 + t) * np * 2 + blk;
        if (kInt4) {
          acc[s][t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d0[t]), _mm512_set1_ps(a.dx[xi])), dv0, acc[s][t]);
          // 1/16: exact (a power of 2), as is the product 16 q qx in int32.
          acc[s][t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d1[t]), _mm512_set1_ps(a.dx[xi + 1] * (1.f / 16))),
                                      dv1, acc[s][t]);
          off[s][t] = _mm512_fmadd_ps(ov0, _mm512_set1_ps(a.xsum[xi]), off[s][t]);
          off[s][t] = _mm512_fmadd_ps(ov1, _mm512_set1_ps(a.xsum[xi + 1]), off[s][t]);
        } else {
          const __m512i dp = RT == 1 ? _mm512_add_epi32(d0[t], d1[t]) : d0[t];
          acc[s][t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dp), _mm512_set1_ps(a.dx[xi])), dv0, acc[s][t]);
          off[s][t] = _mm512_fmadd_ps(ov0, _mm512_set1_ps(a.xsum[xi]), off[s][t]);
        }
      }
    }
  }
  // o = k d when the format has no mins.
  const __m512 k = _mm512_set1_ps(kMins ? 1.f : kInt4 ? -8.f : -128.f);
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 4
    for (int t = 0; t < RT; ++t) {
      const __m512 r = _mm512_fmadd_ps(off[s][t], k, acc[s][t]);
      float* o = y + (t0 + t) * ldy + (g + s) * kQGroup;
      _mm512_storeu_ps(o, accumulate ? _mm512_add_ps(_mm512_loadu_ps(o), r) : r);
    }
}

// Groups [g0, g1): decode 4 groups side by side; more tokens 4 at a time, a group at a time.
template <bool kInt4, bool kMins>
void groups_vnni(const QWeightView& w, const QActView& a, float* y, int64_t ldy, bool acc, int64_t g0, int64_t g1) {
  if (a.T == 1) {
    int64_t g = g0;
    for (; g + 4 <= g1; g += 4) group_kernel<kInt4, kMins, 4, 1>(w, g, a, 0, y, ldy, acc);
    for (; g < g1; ++g) group_kernel<kInt4, kMins, 1, 1>(w, g, a, 0, y, ldy, acc);
    return;
  }
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t t = 0; t < a.T; t += 4) {
      switch (min64(4, a.T - t)) {
        case 4: group_kernel<kInt4, kMins, 1, 4>(w, g, a, t, y, ldy, acc); break;
        case 3: group_kernel<kInt4, kMins, 1, 3>(w, g, a, t, y, ldy, acc); break;
        case 2: group_kernel<kInt4, kMins, 1, 2>(w, g, a, t, y, ldy, acc); break;
        default: group_kernel<kInt4, kMins, 1, 1>(w, g, a, t, y, ldy, acc); break;
      }
    }
}

// The plain rows after the last whole group (fewer than 16) take the kernels below.
// RW weight rows x RT tokens. Weight bytes of a pair are unpacked once per row (int8: |q| and
// the sign mask; int4/int4m: the 64 nibbles) and reused by every token of the block. The
// nibble formats' offsets are added at the end, one offset_term per row and token.
template <bool kInt4, int RW, int RT>
void vnni_kernel(const QWeightView& w, int64_t n, const QActView& a, int64_t t0, float* y, int64_t ldy, bool accumulate,
                 const float* dw /* [RW][nb + 1] float scales, 0 past the end */,
                 const float* ow /* [RW][nb + 1] block offsets (int4m), nullptr for -8 d */) {
  const int64_t nb = w.cols / kQBlock, np = a.np;
  const uint8_t* qw = w.q + n * w.ld;
  __m512 acc[RW][RT];
  for (int r = 0; r < RW; ++r)
    for (int t = 0; t < RT; ++t) acc[r][t] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512(), low4 = _mm512_set1_epi8(0x0F);
  for (int64_t p = 0; p < np; ++p) {
    __m512i wv[RW];
    __mmask64 neg[RW];
    __m512 dwv[RW];
    for (int r = 0; r < RW; ++r) {
      const uint8_t* src = qw + r * w.ld;
      if (kInt4) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + p * 32));
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
        wv[r] = _mm512_and_si512(both, low4);
      } else {
        const __mmask64 m = 2 * p + 1 < nb ? ~__mmask64{0} : __mmask64{0xffffffffu};
        const __m512i q = _mm512_maskz_loadu_epi8(m, src + p * 64);
        neg[r] = _mm512_movepi8_mask(q);
        wv[r] = _mm512_abs_epi8(q);
      }
      const float* d = dw + r * (nb + 1) + 2 * p;
      dwv[r] = _mm512_insertf32x8(_mm512_set1_ps(d[0]), _mm256_set1_ps(d[1]), 1);
    }
    for (int t = 0; t < RT; ++t) {
      const int64_t tt = t0 + t;
      const __m512i qx = _mm512_loadu_si512(a.q + (tt * np + p) * 64);
      const float* dx2 = a.dx + (tt * np + p) * 2;
      const __m512 dxv = _mm512_insertf32x8(_mm512_set1_ps(dx2[0]), _mm256_set1_ps(dx2[1]), 1);
      for (int r = 0; r < RW; ++r) {
        __m512i dp;
        if (kInt4) {
          dp = _mm512_dpbusd_epi32(zero, wv[r], qx);  // sum q qx, q unsigned
        } else {
          const __m512i sx = _mm512_mask_sub_epi8(qx, neg[r], zero, qx);  // qx * sign(qw)
          dp = _mm512_dpbusd_epi32(zero, wv[r], sx);                       // |qw| * that
        }
        acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dp), dxv), dwv[r], acc[r][t]);
      }
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int t = 0; t < RT; ++t) {
      float s = _mm512_reduce_add_ps(acc[r][t]);
      if (kInt4) {  // int4m: its mins; int4: -8 d, one dot over the scales
        const float* xs = a.xsum + (t0 + t) * np * 2;
        s += ow ? offset_term(ow + r * (nb + 1), xs, nb) : -8.f * offset_term(dw + r * (nb + 1), xs, nb);
      }
      float* o = y + (t0 + t) * ldy + n + r;
      *o = accumulate ? *o + s : s;
    }
}

template <bool kInt4, int RW>
void vnni_rt(int rt, const QWeightView& w, int64_t n, const QActView& a, int64_t t0, float* y, int64_t ldy, bool acc,
             const float* dw, const float* ow) {
  switch (rt) {
    case 4: vnni_kernel<kInt4, RW, 4>(w, n, a, t0, y, ldy, acc, dw, ow); break;
    case 3: vnni_kernel<kInt4, RW, 3>(w, n, a, t0, y, ldy, acc, dw, ow); break;
    case 2: vnni_kernel<kInt4, RW, 2>(w, n, a, t0, y, ldy, acc, dw, ow); break;
    default: vnni_kernel<kInt4, RW, 1>(w, n, a, t0, y, ldy, acc, dw, ow); break;
  }
}

template <bool kInt4>
void rows_vnni(const QWeightView& w, const QActView& a, float* y, int64_t ldy, bool acc, int64_t n0, int64_t n1,
               float* scratch) {
  const int64_t nb = w.cols / kQBlock;
  // Fewer than 16 rows: 4 at a time, each unpacked row reused by up to 4 tokens (one kernel
  // for any T, so that a token's sums do not depend on the others: batch invariance).
  constexpr int64_t RW = 4;
  // float32 scales of the rows in flight, one zero past each row's end (a lone last block),
  // and int4m's block offsets o (w = d q + o).
  float* dw = scratch;
  float* ow = scratch + RW * (nb + 1);
  for (int64_t i = 0; i < RW * (nb + 1); ++i) dw[i] = 0.f;
  auto widen = [nb](const uint16_t* src, float* dst) {
    int64_t b = 0;
    for (; b + 16 <= nb; b += 16)
      _mm512_storeu_ps(dst + b, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b))));
    if (b < nb) {
      const __mmask16 mk = static_cast<__mmask16>((1u << (nb - b)) - 1);
      _mm512_mask_storeu_ps(dst + b, mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, src + b)));
    }
  };
  for (int64_t n = n0; n < n1; n += RW) {
    const int rw = static_cast<int>(min64(RW, n1 - n));
    // Offsets o are kept only for int4m (its mins); int4's -8 d is taken from the scales by
    // the kernel (ow = nullptr).
    for (int r = 0; r < rw; ++r) {
      widen(w.scales + (n + r) * nb, dw + r * (nb + 1));
      if (w.mins) widen(w.mins + (n + r) * nb, ow + r * (nb + 1));
    }
    const float* owp = w.mins ? ow : nullptr;
    for (int64_t t = 0; t < a.T; t += 4) {
      const int rt = static_cast<int>(min64(4, a.T - t));
      switch (rw) {
        case 4: vnni_rt<kInt4, 4>(rt, w, n, a, t, y, ldy, acc, dw, owp); break;
        case 3: vnni_rt<kInt4, 3>(rt, w, n, a, t, y, ldy, acc, dw, owp); break;
        case 2: vnni_rt<kInt4, 2>(rt, w, n, a, t, y, ldy, acc, dw, owp); break;
        default: vnni_rt<kInt4, 1>(rt, w, n, a, t, y, ldy, acc, dw, owp); break;
      }
    }
  }
}
}  // namespace

void quant_rows_avx512vnni(const QWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                           int64_t n0, int64_t n1, float* scratch) {
  // Whole interleaved groups first (n0 is a multiple of 16 there), then the plain tail rows.
  const int64_t full = grouped_rows(w.rows), g1 = min64(n1, full) / kQGroup;
  if (n0 < full) {
    if (w.mins)
      groups_vnni<true, true>(w, a, y, ldy, accumulate, n0 / kQGroup, g1);
    else if (w.int4)
      groups_vnni<true, false>(w, a, y, ldy, accumulate, n0 / kQGroup, g1);
    else
      groups_vnni<false, false>(w, a, y, ldy, accumulate, n0 / kQGroup, g1);
    n0 = full;
  }
  if (n0 >= n1) return;
  if (w.int4)
    rows_vnni<true>(w, a, y, ldy, accumulate, n0, n1, scratch);
  else
    rows_vnni<false>(w, a, y, ldy, accumulate, n0, n1, scratch);
}

// ---------------------------------------------------------------------------------------
// K-quants (quant.h) on VNNI: one 16-row group's super-block is 16 * B bytes of 4-byte words,
// word c of the 16 rows one 64-byte line at c * 64, so one line feeds all 16 rows' sums. The
// quants become bytes (q4_k nibbles, q5_k plus the fifth bit, q6_k nibbles plus two bits), all
// unsigned: dpbusd multiplies them with the int8 activations of a broadcast word straight into
// the rows' int32 sums. Per activation block (32 values) the sum is multiplied by the row's
// sub-block scale sc in integers (q6_k: two sub-blocks of 16 per block, each sum first less 32
// times the half block's sum of x, the offset of q - 32), then one FMA scales it by d dx; q4_k
// / q5_k subtract their mins' term (dmin m) xsum per block first. Each row takes the AVX2
// kernel's (and the scalar reference's) integers and the same float operations in the same
// order: the same bits.
namespace {

// Byte e (0..3) of every 32-bit lane, zero-extended (unsigned) or sign-extended (signed).
inline __m512i lane_byte_u(__m512i v, int e) {
  return _mm512_and_si512(_mm512_srli_epi32(v, 8 * e), _mm512_set1_epi32(0xFF));
}
inline __m512i lane_byte_s(__m512i v, int e) { return _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * e), 24); }

// Bit b of every byte moved to bit `to` (other bits of the result: garbage, mask them).
inline __m512i bit_to512(__m512i v, int b, int to) {
  return b <= to ? _mm512_sll_epi16(v, _mm_cvtsi32_si128(to - b)) : _mm512_srl_epi16(v, _mm_cvtsi32_si128(b - to));
}

inline __m512i bcast_word512(const void* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <DType F, int RT>
void kgroup_vnni(const KQWeightView& w, int64_t g, const QActView& a, int64_t t0, float* y, int64_t ldy,
                 bool accumulate) {
  constexpr bool k6 = F == DType::Q6K, k5 = F == DType::Q5K;
  const int64_t B = format_info(F).block_bytes, nsb = w.cols / kQSuper, np = a.np;
  const uint8_t* qg = w.q + g * kQGroup * w.ld;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int8_t* qx[RT];
  const float* dx[RT];
  const float* xs[RT];
  const int16_t* bs[RT];
  for (int t = 0; t < RT; ++t) {
    qx[t] = a.q + (t0 + t) * np * 64;
    dx[t] = a.dx + (t0 + t) * np * 2;
    xs[t] = a.xsum + (t0 + t) * np * 2;
    bs[t] = a.bsum16 + (t0 + t) * np * 4;
  }
  __m512 acc[RT];
  for (int t = 0; t < RT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = qg + sb * kQGroup * B;
    if (sb + 1 < nsb)  // the next super-block's lines, while this one is multiplied
      for (int64_t l = 0; l < B / 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(blk + kQGroup * B + 64 * l), _MM_HINT_T0);
    auto line = [blk](int64_t c) { return _mm512_loadu_si512(blk + 64 * c); };
    // Word 0: d | dmin (fp16) per row.
    const __m512i m0 = line(0);
    const __m512 dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(m0));
    if (!k6) {
      const __m512 dmv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(m0, 16)));
      const __m512i S[2] = {line(1), line(2)}, M[2] = {line(3), line(4)};
      for (int s = 0; s < 8; ++s) {  // the mins' term: - (dmin m_s) xsum_b
        const __m512 mv = _mm512_mul_ps(_mm512_cvtepi32_ps(lane_byte_u(M[s / 4], s % 4)), dmv);
        for (int t = 0; t < RT; ++t) acc[t] = _mm512_fnmadd_ps(mv, _mm512_set1_ps(xs[t][8 * sb + s]), acc[t]);
      }
      for (int p = 0; p < 4; ++p) {  // sub-blocks 2p (low nibbles) and 2p + 1 (high)
        const __m512i sca = lane_byte_u(S[p / 2], (2 * p) % 4), scb = lane_byte_u(S[p / 2], (2 * p) % 4 + 1);
        const int64_t b0 = 8 * sb + 2 * p;
        __m512i d0[RT], d1[RT];
        for (int t = 0; t < RT; ++t) d0[t] = d1[t] = _mm512_setzero_si512();
        for (int c = 0; c < 8; ++c) {
          const __m512i v = line(5 + 8 * p + c);
          __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          if (k5) {
            const __m512i H = line(37 + c), b4 = _mm512_set1_epi8(16);
            lo = _mm512_or_si512(lo, _mm512_and_si512(bit_to512(H, 2 * p, 4), b4));
            hi = _mm512_or_si512(hi, _mm512_and_si512(bit_to512(H, 2 * p + 1, 4), b4));
          }
          for (int t = 0; t < RT; ++t) {
            d0[t] = _mm512_dpbusd_epi32(d0[t], lo, bcast_word512(qx[t] + b0 * 32 + 4 * c));
            d1[t] = _mm512_dpbusd_epi32(d1[t], hi, bcast_word512(qx[t] + (b0 + 1) * 32 + 4 * c));
          }
        }
        for (int t = 0; t < RT; ++t) {
          const __m512i i0 = _mm512_mullo_epi32(d0[t], sca), i1 = _mm512_mullo_epi32(d1[t], scb);
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(dv, _mm512_set1_ps(dx[t][b0])), acc[t]);
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(dv, _mm512_set1_ps(dx[t][b0 + 1])), acc[t]);
        }
      }
    } else {
      const __m512i S[4] = {line(1), line(2), line(3), line(4)};  // sc[4i..4i+3], int8
      const __m512i b30 = _mm512_set1_epi8(0x30);
      for (int k = 0; k < 2; ++k)      // the super-block's halves: quarters 4k + j = blocks 8 sb + 4k + j
        for (int e = 0; e < 2; ++e) {  // quarters e (low nibbles of ql run e) and e + 2 (high)
          // Quarter j's sub-blocks 8k + 2j and 8k + 2j + 1: bytes 2e, 2e + 1 of word 2k + j / 2.
          const __m512i W0 = S[2 * k], W1 = S[2 * k + 1];
          const __m512i sc0[2] = {lane_byte_s(W0, 2 * e), lane_byte_s(W0, 2 * e + 1)};
          const __m512i sc1[2] = {lane_byte_s(W1, 2 * e), lane_byte_s(W1, 2 * e + 1)};
          const int j0 = e, j1 = e + 2;
          const int64_t b0 = 8 * sb + 4 * k + j0, b1 = 8 * sb + 4 * k + j1;
          __m512i d0[2][RT], d1[2][RT];  // [half block][token]
          for (int h = 0; h < 2; ++h)
            for (int t = 0; t < RT; ++t) d0[h][t] = d1[h][t] = _mm512_setzero_si512();
          for (int c = 0; c < 8; ++c) {
            const __m512i X = line(5 + 16 * k + 8 * e + c), H = line(37 + 8 * k + c);
            const __m512i q0 = _mm512_or_si512(_mm512_and_si512(X, low4), _mm512_and_si512(bit_to512(H, 2 * j0, 4), b30));
            const __m512i q1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(X, 4), low4),
                                               _mm512_and_si512(bit_to512(H, 2 * j1, 4), b30));
            for (int t = 0; t < RT; ++t) {
              d0[c / 4][t] = _mm512_dpbusd_epi32(d0[c / 4][t], q0, bcast_word512(qx[t] + b0 * 32 + 4 * c));
              d1[c / 4][t] = _mm512_dpbusd_epi32(d1[c / 4][t], q1, bcast_word512(qx[t] + b1 * 32 + 4 * c));
            }
          }
          // q - 32 per half block h: sc_h (sum q x - 32 sum x), summed over the block's halves.
          for (int t = 0; t < RT; ++t) {
            __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
            for (int h = 0; h < 2; ++h) {
              const __m512i x0 = _mm512_set1_epi32(32 * bs[t][2 * b0 + h]), x1 = _mm512_set1_epi32(32 * bs[t][2 * b1 + h]);
              i0 = _mm512_add_epi32(i0, _mm512_mullo_epi32(_mm512_sub_epi32(d0[h][t], x0), sc0[h]));
              i1 = _mm512_add_epi32(i1, _mm512_mullo_epi32(_mm512_sub_epi32(d1[h][t], x1), sc1[h]));
            }
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(dv, _mm512_set1_ps(dx[t][b0])), acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(dv, _mm512_set1_ps(dx[t][b1])), acc[t]);
          }
        }
    }
  }
  for (int t = 0; t < RT; ++t) {
    float* o = y + (t0 + t) * ldy + g * kQGroup;
    _mm512_storeu_ps(o, accumulate ? _mm512_add_ps(_mm512_loadu_ps(o), acc[t]) : acc[t]);
  }
}

template <DType F>
void kgroups_vnni(const KQWeightView& w, int64_t g, const QActView& a, float* y, int64_t ldy, bool accumulate) {
  for (int64_t t = 0; t < a.T;) {
    const int64_t left = a.T - t;
    if (left >= 4) {
      kgroup_vnni<F, 4>(w, g, a, t, y, ldy, accumulate);
      t += 4;
    } else if (left >= 2) {
      kgroup_vnni<F, 2>(w, g, a, t, y, ldy, accumulate);
      t += 2;
    } else {
      kgroup_vnni<F, 1>(w, g, a, t, y, ldy, accumulate);
      t += 1;
    }
  }
}

}  // namespace

int64_t kquant_groups_avx512vnni(const KQWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                                 int64_t n0, int64_t n1) {
  const int64_t full = grouped_rows(w.rows);
  for (; n0 < n1 && n0 < full; n0 += kQGroup) {
    if (w.format == DType::Q4K)
      kgroups_vnni<DType::Q4K>(w, n0 / kQGroup, a, y, ldy, accumulate);
    else if (w.format == DType::Q5K)
      kgroups_vnni<DType::Q5K>(w, n0 / kQGroup, a, y, ldy, accumulate);
    else
      kgroups_vnni<DType::Q6K>(w, n0 / kQGroup, a, y, ldy, accumulate);
  }
  return n0;
}

}  // namespace gemma
