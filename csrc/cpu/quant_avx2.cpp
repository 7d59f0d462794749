// Quantized matmul kernel for AVX2 + FMA + F16C (compiled with those flags; called only when
// the CPU has them). One block of 32 is one 256-bit vector of bytes: vpmaddubsw multiplies
// unsigned by signed bytes into pairs of int16 (|products| <= 2 * 127 * 127 < 2^15 with the
// sign trick for int8, 2 * 15 * 127 for int4 nibbles: no saturation), vpmaddwd sums the pairs
// into 8 int32 lanes, and one FMA scales them by dw * dx of the block. int4 / int4m add
// their block offsets' term once per row and token (quant.cpp). See quant_kernels.h.
#include <immintrin.h>

#include <cstring>

#include "cpu/quant.h"
#include "cpu/quant_kernels.h"

namespace gemma {
namespace {

inline __m256 block_dot(__m256i u8, __m256i s8) {
  const __m256i pairs = _mm256_maddubs_epi16(u8, s8);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// One interleaved group of 16 rows (quant.h) for RT tokens (1-4). Each 64-byte line is two
// vectors of 8 rows' 4 bytes: loaded (and, for int8, made absolute) once, then multiplied with
// every token's matching 4 activation bytes, broadcast; summed in int32 per block and token,
// and scaled by the block's 8 + 8 scales from one load each. A token's sums see the same
// operations in the same order whatever RT is, so its results do not depend on which other
// tokens share the call (batch invariance). The offsets' term (int4: -8 d, int4m: m) is a
// second pass over the group's scales.
template <bool kInt4, bool kMins, int RT>
void group_avx2(const QWeightView& w, int64_t g, const QActView& a, int64_t t0, float* y, int64_t ldy,
                bool accumulate) {
  const int64_t nb = w.cols / kQBlock, np = a.np, steps = kInt4 ? np : nb;
  const uint8_t* qg = w.q + g * kQGroup * w.ld;
  const uint16_t* sg = w.scales + g * kQGroup * nb;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* qx[RT];
  const float* dx[RT];
  for (int t = 0; t < RT; ++t) {
    qx[t] = a.q + (t0 + t) * np * 64;
    dx[t] = a.dx + (t0 + t) * np * 2;
  }
  auto word = [](const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  };
  __m256 acc[2][RT];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < RT; ++t) acc[h][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < steps; ++b) {
    const uint8_t* src = qg + b * 512;
    // Fetch the lines 4 steps on (the next group's, near a group's end: groups follow each
    // other in memory), so that a few tokens' work hides the memory latency.
    for (int l = 0; l < 8; ++l) _mm_prefetch(reinterpret_cast<const char*>(src + 2048 + 64 * l), _MM_HINT_T0);
    // Blocks of this step: int8 b; int4 2b and 2b + 1 (none past a lone last block).
    const int64_t blk = kInt4 ? 2 * b : b;
    const bool second = kInt4 && 2 * b + 1 < nb;
    for (int h = 0; h < 2; ++h) {  // rows 0-7, then 8-15
      // Loads stay inside their half: hoisting the activation broadcasts out of this loop
      // (GCC 12 does) spills them all to the stack.
      asm volatile("" ::: "memory");
      __m256i d0[RT], d1[RT];
      for (int t = 0; t < RT; ++t) d0[t] = d1[t] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * c + 32 * h));
        if (kInt4) {
          const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          for (int t = 0; t < RT; ++t) {
            const int8_t* x = qx[t] + b * 64 + 4 * c;
            d0[t] = _mm256_add_epi32(d0[t], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, word(x)), ones));
            d1[t] = _mm256_add_epi32(d1[t], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, word(x + 32)), ones));
          }
        } else {
          const __m256i u = _mm256_abs_epi8(v);
          for (int t = 0; t < RT; ++t) {
            const __m256i x = word(qx[t] + b * 32 + 4 * c);
            d0[t] = _mm256_add_epi32(d0[t], _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, v)), ones));
          }
        }
        // The sums stay running sums in registers: left alone, GCC 12 computes all 8 lines'
        // products first and adds them in a tree, spilling them to the stack.
        for (int t = 0; t < RT; ++t) {
          asm("" : "+x"(d0[t]));
          if (kInt4) asm("" : "+x"(d1[t]));
        }
      }
      const __m256 dv0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + blk * kQGroup + 8 * h)));
      for (int t = 0; t < RT; ++t)
        acc[h][t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d0[t]), _mm256_set1_ps(dx[t][blk])), dv0, acc[h][t]);
      if (second) {
        const __m256 dv1 =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + (blk + 1) * kQGroup + 8 * h)));
        for (int t = 0; t < RT; ++t)
          acc[h][t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d1[t]), _mm256_set1_ps(dx[t][blk + 1])), dv1,
                                      acc[h][t]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    __m256 off[RT];
    for (int t = 0; t < RT; ++t) off[t] = _mm256_setzero_ps();
    if (kInt4) {  // sum_b o_b xsum_b, o = m (int4m) or -8 d (int4, the factor applied below)
      const uint16_t* og = kMins ? w.mins + g * kQGroup * nb : sg;
      for (int64_t blk = 0; blk < nb; ++blk) {
        const __m256 ov = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(og + blk * kQGroup + 8 * h)));
        for (int t = 0; t < RT; ++t)
          off[t] = _mm256_fmadd_ps(ov, _mm256_set1_ps(a.xsum[(t0 + t) * np * 2 + blk]), off[t]);
      }
    }
    const __m256 kf = _mm256_set1_ps(kMins ? 1.f : -8.f);
    for (int t = 0; t < RT; ++t) {
      const __m256 r = kInt4 ? _mm256_fmadd_ps(off[t], kf, acc[h][t]) : acc[h][t];
      float* o = y + (t0 + t) * ldy + g * kQGroup + 8 * h;
      _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), r) : r);
    }
  }
}

template <bool kInt4, bool kMins>
void groups_avx2(const QWeightView& w, int64_t g, const QActView& a, float* y, int64_t ldy, bool accumulate) {
  for (int64_t t = 0; t < a.T; t += 4) {
    switch (a.T - t < 4 ? a.T - t : 4) {
      case 4: group_avx2<kInt4, kMins, 4>(w, g, a, t, y, ldy, accumulate); break;
      case 3: group_avx2<kInt4, kMins, 3>(w, g, a, t, y, ldy, accumulate); break;
      case 2: group_avx2<kInt4, kMins, 2>(w, g, a, t, y, ldy, accumulate); break;
      default: group_avx2<kInt4, kMins, 1>(w, g, a, t, y, ldy, accumulate); break;
    }
  }
}

}  // namespace

void quant_rows_avx2(const QWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                     int64_t n0, int64_t n1, float* scratch) {
  const int64_t nb = w.cols / kQBlock;
  // Whole interleaved groups first (n0 is a multiple of 16 there), then the plain tail rows.
  const int64_t full = grouped_rows(w.rows);
  for (; n0 < n1 && n0 < full; n0 += kQGroup) {
    if (w.mins)
      groups_avx2<true, true>(w, n0 / kQGroup, a, y, ldy, accumulate);
    else if (w.int4)
      groups_avx2<true, false>(w, n0 / kQGroup, a, y, ldy, accumulate);
    else
      groups_avx2<false, false>(w, n0 / kQGroup, a, y, ldy, accumulate);
  }
  float* dw = scratch;           // one row's float scales
  float* ow = scratch + nb + 1;  // and block offsets (int4: -8 d, int4m: m; w = d q + o)
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  auto widen = [nb](const uint16_t* src, float* dst) {
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8)
      _mm256_storeu_ps(dst + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + b))));
    for (; b < nb; ++b) dst[b] = f16_to_f32(src[b]);
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = w.q + n * w.ld;
    widen(w.scales + n * nb, dw);
    if (w.mins)
      widen(w.mins + n * nb, ow);
    else if (w.int4)
      for (int64_t b = 0; b < nb; ++b) ow[b] = -8.f * dw[b];
    for (int64_t t = 0; t < a.T; ++t) {
      const int8_t* qx = a.q + t * a.np * 64;
      const float* dx = a.dx + t * a.np * 2;
      __m256 acc = _mm256_setzero_ps();
      float offs = 0.f;  // int4/int4m: sum_b o_b xsum_b
      if (w.int4) {
        const float* xs = a.xsum + t * a.np * 2;
        __m256 c = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 8 <= nb; b += 8) c = _mm256_fmadd_ps(_mm256_loadu_ps(ow + b), _mm256_loadu_ps(xs + b), c);
        offs = hsum8(c);
        for (; b < nb; ++b) offs += ow[b] * xs[b];
      }
      for (int64_t blk = 0; blk < nb; ++blk) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + blk * 32));
        __m256 d;
        if (w.int4) {
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + (blk / 2) * 32));
          const __m256i nib = _mm256_and_si256(blk % 2 ? _mm256_srli_epi16(bytes, 4) : bytes, low4);
          d = block_dot(nib, xv);
        } else {
          const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + blk * 32));
          d = block_dot(_mm256_abs_epi8(qv), _mm256_sign_epi8(xv, qv));
        }
        acc = _mm256_fmadd_ps(d, _mm256_set1_ps(dw[blk] * dx[blk]), acc);
      }
      const float s = hsum8(acc) + offs;
      float* o = y + t * ldy + n;
      *o = accumulate ? *o + s : s;
    }
  }
}

}  // namespace gemma
