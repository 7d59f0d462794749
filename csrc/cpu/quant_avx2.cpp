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

// One interleaved group of 16 rows (quant.h) for one token: each 64-byte line is two vectors
// of 8 rows' 4 bytes, multiplied with the matching 4 activation bytes broadcast, summed in
// int32 per block, and scaled by the block's 8 + 8 scales from one load each.
void group_avx2(const QWeightView& w, int64_t g, const QActView& a, int64_t t, float* y, bool accumulate) {
  const int64_t nb = w.cols / kQBlock, np = a.np, steps = w.int4 ? np : nb;
  const uint8_t* qg = w.q + g * kQGroup * w.ld;
  const uint16_t* sg = w.scales + g * kQGroup * nb;
  const uint16_t* mg = w.mins ? w.mins + g * kQGroup * nb : nullptr;
  const int8_t* qx = a.q + t * np * 64;
  const float* dx = a.dx + t * np * 2;
  const float* xs = a.xsum + t * np * 2;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, off[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  auto word = [](const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  };
  for (int64_t b = 0; b < steps; ++b) {
    const uint8_t* src = qg + b * 512;
    for (int h = 0; h < 2; ++h) {  // rows 0-7, then 8-15
      __m256i d0 = _mm256_setzero_si256(), d1 = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64 * c + 32 * h));
        if (w.int4) {
          const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          const int8_t* x = qx + b * 64 + 4 * c;
          d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, word(x)), ones));
          d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, word(x + 32)), ones));
        } else {
          const __m256i x = word(qx + b * 32 + 4 * c);
          d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(x, v)), ones));
        }
      }
      // Blocks of this step: int8 b; int4 2b and 2b + 1 (none past a lone last block).
      const int64_t blk = w.int4 ? 2 * b : b;
      const int nblk = w.int4 && 2 * b + 1 < nb ? 2 : 1;
      for (int k = 0; k < nblk; ++k) {
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + (blk + k) * kQGroup + 8 * h)));
        const __m256 ov = mg ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mg + (blk + k) * kQGroup + 8 * h)))
                             : dv;
        acc[h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(k ? d1 : d0), _mm256_set1_ps(dx[blk + k])), dv, acc[h]);
        if (w.int4) off[h] = _mm256_fmadd_ps(ov, _mm256_set1_ps(xs[blk + k]), off[h]);
      }
    }
  }
  const __m256 kf = _mm256_set1_ps(w.mins ? 1.f : -8.f);  // int4m: o = m; int4: o = -8 d
  float* o = y + g * kQGroup;
  for (int h = 0; h < 2; ++h) {
    const __m256 r = _mm256_fmadd_ps(off[h], kf, acc[h]);
    _mm256_storeu_ps(o + 8 * h, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o + 8 * h), r) : r);
  }
}

}  // namespace

void quant_rows_avx2(const QWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                     int64_t n0, int64_t n1, float* scratch) {
  const int64_t nb = w.cols / kQBlock;
  // Whole interleaved groups first (n0 is a multiple of 16 there), then the plain tail rows.
  const int64_t full = grouped_rows(w.rows);
  for (; n0 < n1 && n0 < full; n0 += kQGroup)
    for (int64_t t = 0; t < a.T; ++t) group_avx2(w, n0 / kQGroup, a, t, y + t * ldy, accumulate);
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
