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

// ---------------------------------------------------------------------------------------
// K-quants (quant.h): one 16-row group's super-block is 16 * B bytes of 4-byte words, word c
// of rows 8h..8h+7 one vector at c * 64 + 32 h. The quants become bytes (q4_k nibbles, q5_k
// plus the fifth bit, q6_k nibbles plus two bits); vpmaddubsw multiplies them with the
// activations as the int4 kernel does, and vpmaddwd, instead of summing pairs with 1s, sums
// them times the row's sub-block scale sc (an int16 pair per row, taken from the meta words
// by one byte shuffle): each activation block's integer sum then holds sc q x exactly, and
// one FMA scales it by d dx. q4_k / q5_k subtract their mins' term (dmin m) xsum per block;
// q6_k subtracts 32 sc (sum of x) in integers first, from the half blocks' sums of x.
namespace {

// A byte shuffle control, the same for every 4-byte word: byte e of word i takes byte b_e of
// word i (b_e < 0: zero).
inline __m256i word_ctrl(int b0, int b1, int b2, int b3) {
  auto byte = [](int b, int shift) { return static_cast<uint32_t>(b < 0 ? 0x80 : b) << shift; };
  const __m256i pattern = _mm256_set1_epi32(static_cast<int32_t>(byte(b0, 0) | byte(b1, 8) | byte(b2, 16) | byte(b3, 24)));
  const __m256i words = _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404, 0x08080808, 0x0C0C0C0C);
  return _mm256_add_epi8(pattern, words);  // 0x80 + 4i keeps its high bit: still zero
}

// Bit b of every byte moved to bit `to` (other bits of the result: garbage, mask them).
inline __m256i bit_to(__m256i v, int b, int to) {
  return b <= to ? _mm256_sll_epi16(v, _mm_cvtsi32_si128(to - b)) : _mm256_srl_epi16(v, _mm_cvtsi32_si128(b - to));
}

inline __m256i bcast_word(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <DType F, int RT>
void kgroup_avx2(const KQWeightView& w, int64_t g, const QActView& a, int64_t t0, float* y, int64_t ldy,
                 bool accumulate) {
  constexpr bool k6 = F == DType::Q6K, k5 = F == DType::Q5K;
  const int64_t B = format_info(F).block_bytes, nsb = w.cols / kQSuper, np = a.np;
  const uint8_t* qg = w.q + g * kQGroup * w.ld;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
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
  __m256 acc[2][RT];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < RT; ++t) acc[h][t] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = qg + sb * kQGroup * B;
    if (sb + 1 < nsb)  // the next super-block's lines, while this one is multiplied
      for (int64_t l = 0; l < B / 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(blk + kQGroup * B + 64 * l), _MM_HINT_T0);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* base = blk + 32 * h;  // word c of rows 8h..8h+7: base + 64 c
      auto line = [base](int64_t c) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 64 * c)); };
      // Word 0: d | dmin (fp16) per row -> 8 + 8 floats.
      const __m256i m0 = line(0);
      const __m256i dd = _mm256_permute4x64_epi64(
          _mm256_packus_epi32(_mm256_and_si256(m0, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(m0, 16)), 0xD8);
      const __m256 dv = _mm256_cvtph_ps(_mm256_castsi256_si128(dd));
      if (!k6) {
        const __m256 dmv = _mm256_cvtph_ps(_mm256_extracti128_si256(dd, 1));
        const __m256i S[2] = {line(1), line(2)}, M[2] = {line(3), line(4)};
        for (int s = 0; s < 8; ++s) {  // the mins' term: - (dmin m_s) xsum_b
          const __m256 mv =
              _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_shuffle_epi8(M[s / 4], word_ctrl(s % 4, -1, -1, -1))), dmv);
          for (int t = 0; t < RT; ++t)
            acc[h][t] = _mm256_fnmadd_ps(mv, _mm256_set1_ps(xs[t][8 * sb + s]), acc[h][t]);
        }
        for (int p = 0; p < 4; ++p) {  // sub-blocks 2p (low nibbles) and 2p + 1 (high)
          const int e0 = (2 * p) % 4, e1 = e0 + 1;
          const __m256i sca = _mm256_shuffle_epi8(S[p / 2], word_ctrl(e0, -1, e0, -1));
          const __m256i scb = _mm256_shuffle_epi8(S[p / 2], word_ctrl(e1, -1, e1, -1));
          const int64_t b0 = 8 * sb + 2 * p;
          asm volatile("" ::: "memory");
          __m256i d0[RT], d1[RT];
          for (int t = 0; t < RT; ++t) d0[t] = d1[t] = _mm256_setzero_si256();
          for (int c = 0; c < 8; ++c) {
            const __m256i v = line(5 + 8 * p + c);
            __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            if (k5) {
              const __m256i H = line(37 + c), b4 = _mm256_set1_epi8(16);
              lo = _mm256_or_si256(lo, _mm256_and_si256(bit_to(H, 2 * p, 4), b4));
              hi = _mm256_or_si256(hi, _mm256_and_si256(bit_to(H, 2 * p + 1, 4), b4));
            }
            for (int t = 0; t < RT; ++t) {
              d0[t] = _mm256_add_epi32(d0[t], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, bcast_word(qx[t] + b0 * 32 + 4 * c)), sca));
              d1[t] = _mm256_add_epi32(d1[t],
                                       _mm256_madd_epi16(_mm256_maddubs_epi16(hi, bcast_word(qx[t] + (b0 + 1) * 32 + 4 * c)), scb));
              asm("" : "+x"(d0[t]), "+x"(d1[t]));
            }
          }
          for (int t = 0; t < RT; ++t) {
            acc[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0[t]), _mm256_mul_ps(dv, _mm256_set1_ps(dx[t][b0])), acc[h][t]);
            acc[h][t] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1[t]), _mm256_mul_ps(dv, _mm256_set1_ps(dx[t][b0 + 1])), acc[h][t]);
          }
        }
      } else {
        const __m256i S[4] = {line(1), line(2), line(3), line(4)};  // sc[4i..4i+3], int8
        const __m256i b30 = _mm256_set1_epi8(0x30);
        for (int k = 0; k < 2; ++k)      // the super-block's halves: quarters 4k + j = blocks 8 sb + 4k + j
          for (int e = 0; e < 2; ++e) {  // quarters e (low nibbles of ql run e) and e + 2 (high)
            // Quarter j's sub-blocks 8k + 2j and 8k + 2j + 1: bytes 2e, 2e + 1 of word 2k + j / 2.
            const __m256i W0 = S[2 * k], W1 = S[2 * k + 1];
            const int e0 = 2 * e, e1 = 2 * e + 1;
            const __m256i sc0[2] = {_mm256_srai_epi16(_mm256_shuffle_epi8(W0, word_ctrl(-1, e0, -1, e0)), 8),
                                    _mm256_srai_epi16(_mm256_shuffle_epi8(W0, word_ctrl(-1, e1, -1, e1)), 8)};
            const __m256i sc1[2] = {_mm256_srai_epi16(_mm256_shuffle_epi8(W1, word_ctrl(-1, e0, -1, e0)), 8),
                                    _mm256_srai_epi16(_mm256_shuffle_epi8(W1, word_ctrl(-1, e1, -1, e1)), 8)};
            const int j0 = e, j1 = e + 2;
            const int64_t b0 = 8 * sb + 4 * k + j0, b1 = 8 * sb + 4 * k + j1;
            asm volatile("" ::: "memory");
            __m256i d0[RT], d1[RT];
            for (int t = 0; t < RT; ++t) d0[t] = d1[t] = _mm256_setzero_si256();
            for (int c = 0; c < 8; ++c) {
              const __m256i X = line(5 + 16 * k + 8 * e + c), H = line(37 + 8 * k + c);
              const __m256i q0 = _mm256_or_si256(_mm256_and_si256(X, low4), _mm256_and_si256(bit_to(H, 2 * j0, 4), b30));
              const __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(X, 4), low4),
                                                 _mm256_and_si256(bit_to(H, 2 * j1, 4), b30));
              for (int t = 0; t < RT; ++t) {
                d0[t] = _mm256_add_epi32(
                    d0[t], _mm256_madd_epi16(_mm256_maddubs_epi16(q0, bcast_word(qx[t] + b0 * 32 + 4 * c)), sc0[c / 4]));
                d1[t] = _mm256_add_epi32(
                    d1[t], _mm256_madd_epi16(_mm256_maddubs_epi16(q1, bcast_word(qx[t] + b1 * 32 + 4 * c)), sc1[c / 4]));
                asm("" : "+x"(d0[t]), "+x"(d1[t]));
              }
            }
            // q - 32: subtract 32 (sc_a sum x_a + sc_b sum x_b), the half blocks' sums.
            const __m256i p0 = _mm256_srai_epi16(_mm256_shuffle_epi8(W0, word_ctrl(-1, e0, -1, e1)), 8);
            const __m256i p1 = _mm256_srai_epi16(_mm256_shuffle_epi8(W1, word_ctrl(-1, e0, -1, e1)), 8);
            for (int t = 0; t < RT; ++t) {
              d0[t] = _mm256_sub_epi32(d0[t], _mm256_slli_epi32(_mm256_madd_epi16(p0, bcast_word(bs[t] + 2 * b0)), 5));
              d1[t] = _mm256_sub_epi32(d1[t], _mm256_slli_epi32(_mm256_madd_epi16(p1, bcast_word(bs[t] + 2 * b1)), 5));
              acc[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0[t]), _mm256_mul_ps(dv, _mm256_set1_ps(dx[t][b0])), acc[h][t]);
              acc[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1[t]), _mm256_mul_ps(dv, _mm256_set1_ps(dx[t][b1])), acc[h][t]);
            }
          }
      }
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < RT; ++t) {
      float* o = y + (t0 + t) * ldy + g * kQGroup + 8 * h;
      _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), acc[h][t]) : acc[h][t]);
    }
}

template <DType F>
void kgroups_avx2(const KQWeightView& w, int64_t g, const QActView& a, float* y, int64_t ldy, bool accumulate) {
  for (int64_t t = 0; t < a.T;) {
    const int64_t left = a.T - t;
    if (left >= 4) {
      kgroup_avx2<F, 4>(w, g, a, t, y, ldy, accumulate);
      t += 4;
    } else if (left >= 2) {
      kgroup_avx2<F, 2>(w, g, a, t, y, ldy, accumulate);
      t += 2;
    } else {
      kgroup_avx2<F, 1>(w, g, a, t, y, ldy, accumulate);
      t += 1;
    }
  }
}

}  // namespace

int64_t kquant_groups_avx2(const KQWeightView& w, const QActView& a, float* y, int64_t ldy, bool accumulate,
                           int64_t n0, int64_t n1) {
  const int64_t full = grouped_rows(w.rows);
  for (; n0 < n1 && n0 < full; n0 += kQGroup) {
    if (w.format == DType::Q4K)
      kgroups_avx2<DType::Q4K>(w, n0 / kQGroup, a, y, ldy, accumulate);
    else if (w.format == DType::Q5K)
      kgroups_avx2<DType::Q5K>(w, n0 / kQGroup, a, y, ldy, accumulate);
    else
      kgroups_avx2<DType::Q6K>(w, n0 / kQGroup, a, y, ldy, accumulate);
  }
  return n0;
}

}  // namespace gemma
