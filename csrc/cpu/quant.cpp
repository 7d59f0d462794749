// Quantized formats (quant.h): reference encoders and decoders, the threaded quantizer, and
// the quantized matmul (int8 activations x int8/int4 weights, integer dot products).
#include "cpu/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd.h"
#include "engine/threadpool.h"

namespace gemma {

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u)  // inf, nan (quiet, payload kept where it fits)
    return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (ax < 0x38800000u) {  // a half subnormal: count units of 2^-24, nearest even
    float a;
    std::memcpy(&a, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t r = ax - 0x38000000u;  // exponent bias 127 -> 15
  r = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;
  return static_cast<uint16_t>(sign | r);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t x;
  if (e == 0) {
    const float f = static_cast<float>(m) * (1.0f / 16777216.0f);
    std::memcpy(&x, &f, 4);
    x |= sign;
  } else if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else {
    x = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// ggml's quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d) (half away from zero).
void quantize_row_int8_ref(const float* x, int64_t K, int8_t* q, uint16_t* d) {
  for (int64_t b = 0; b < K / kQBlock; ++b) {
    const float* xb = x + b * kQBlock;
    float amax = 0.f;
    for (int j = 0; j < kQBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float db = amax / 127.f, id = db != 0.f ? 1.0f / db : 0.f;
    d[b] = f32_to_f16(db);
    for (int j = 0; j < kQBlock; ++j) q[b * kQBlock + j] = static_cast<int8_t>(std::roundf(xb[j] * id));
  }
}

// ggml's quantize_row_q4_0_ref: d = (the value of largest magnitude) / -8,
// q = min(15, trunc(x / d + 8.5)). Packed in block pairs (quant.h).
void quantize_row_int4_ref(const float* x, int64_t K, uint8_t* q, uint16_t* d) {
  const int64_t nb = K / kQBlock;
  std::memset(q, 0, static_cast<size_t>(quant_row_bytes(QFormat::Int4, K)));
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQBlock;
    float amax = 0.f, vmax = 0.f;
    for (int j = 0; j < kQBlock; ++j)
      if (amax < std::fabs(xb[j])) {
        amax = std::fabs(xb[j]);
        vmax = xb[j];
      }
    const float db = vmax / -8.f, id = db != 0.f ? 1.0f / db : 0.f;
    d[b] = f32_to_f16(db);
    uint8_t* pair = q + (b / 2) * 32;
    const int shift = (b % 2) * 4;
    for (int j = 0; j < kQBlock; ++j) {
      const float v = xb[j] * id;  // two float32 roundings, as ggml (no fused multiply-add)
      const int qi = std::min(15, static_cast<int>(static_cast<int8_t>(v + 8.5f)));
      pair[j] = static_cast<uint8_t>(pair[j] | (qi << shift));
    }
  }
}

void dequantize_row(QFormat f, const uint8_t* q, const uint16_t* d, int64_t K, float* out) {
  for (int64_t b = 0; b < K / kQBlock; ++b) {
    const float db = f16_to_f32(d[b]);
    for (int j = 0; j < kQBlock; ++j) {
      const int v = f == QFormat::Int8 ? static_cast<int8_t>(q[b * kQBlock + j])
                                       : ((q[(b / 2) * 32 + j] >> ((b % 2) * 4)) & 0xF) - 8;
      out[b * kQBlock + j] = static_cast<float>(v) * db;
    }
  }
}

void quantize_matrix(QFormat f, const void* src, bool src_bf16, int64_t rows, int64_t K, uint8_t* q,
                     uint16_t* d) {
  const int64_t qb = quant_row_bytes(f, K), nb = scale_row_count(K);
  parallel_for(rows, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t r = r0; r < r1; ++r) {
      const float* x;
      if (src_bf16) {
        const uint16_t* s = static_cast<const uint16_t*>(src) + r * K;
        for (int64_t k = 0; k < K; ++k) row[k] = bf16_to_f32(s[k]);
        x = row.data();
      } else {
        x = static_cast<const float*>(src) + r * K;
      }
      if (f == QFormat::Int8)
        quantize_row_int8_ref(x, K, reinterpret_cast<int8_t*>(q + r * qb), d + r * nb);
      else
        quantize_row_int4_ref(x, K, q + r * qb, d + r * nb);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Quantized matmul.
//
// Activations: each token row is quantized per block of 32 to int8 with scale
// dx = amax / 127 and q = nearest-even(x * 127 / amax), laid out in block pairs of 64 bytes
// (a lone last block pairs with zeros). With the weights' block pairs this gives, per pair,
// one 64-byte integer dot product whose 16 int32 lanes hold 4 products each: lanes 0-7
// belong to block 2p, lanes 8-15 to block 2p + 1, scaled by dx * dw of their block.
namespace {

struct QActs {
  int64_t T = 0, np = 0;
  std::vector<int8_t> q;      // [T][np * 64]
  std::vector<float> dx;      // [T][np * 2]: the block scales
  std::vector<int32_t> qsum;  // [T][np * 16]: per dot-product lane, the sum of its 4 q (int4's -8 term)
  // One token (decode) only:
  std::vector<float> dxe;     // [np * 16]: the scale of each lane's block
  std::vector<uint8_t> ux;    // [np * 64]: q + 128, unsigned (int8 weights' dot products)
};

QActs quantize_acts(const float* x, int64_t T, int64_t ldx, int64_t K) {
  QActs a;
  const int64_t nb = K / kQBlock;
  a.T = T;
  a.np = (nb + 1) / 2;
  a.q.assign(static_cast<size_t>(T * a.np * 64), 0);
  a.dx.assign(static_cast<size_t>(T * a.np * 2), 0.f);
  a.qsum.assign(static_cast<size_t>(T * a.np * 16), 0);
  auto row = [&](int64_t t) {
    const float* xr = x + t * ldx;
    int8_t* q = a.q.data() + t * a.np * 64;
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.f;
      for (int j = 0; j < kQBlock; ++j) amax = std::max(amax, std::fabs(xr[b * kQBlock + j]));
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      a.dx[t * a.np * 2 + b] = amax / 127.f;
      for (int j = 0; j < kQBlock; ++j) {
        const float v = std::nearbyint(xr[b * kQBlock + j] * id);
        q[b * kQBlock + j] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, v)));
      }
    }
    for (int64_t l = 0; l < a.np * 16; ++l) {
      int32_t s = 0;
      for (int i = 0; i < 4; ++i) s += q[l * 4 + i];
      a.qsum[t * a.np * 16 + l] = s;
    }
  };
  if (T * K < (int64_t{1} << 16)) {
    for (int64_t t = 0; t < T; ++t) row(t);
  } else {
    parallel_for(T, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) row(t);
    });
  }
  if (T == 1) {
    a.dxe.resize(static_cast<size_t>(a.np * 16));
    a.ux.resize(static_cast<size_t>(a.np * 64));
    for (int64_t l = 0; l < a.np * 16; ++l) a.dxe[l] = a.dx[(l / 16) * 2 + (l % 16) / 8];
    for (int64_t i = 0; i < a.np * 64; ++i) a.ux[i] = static_cast<uint8_t>(a.q[i] + 128);
  }
  return a;
}

// The scalar path: integer dot product per block, scaled per block. The reference the SIMD
// path is tested against (both against float64 with a bound in the tests).
void rows_scalar(const Weight& w, const QActs& a, float* y, int64_t ldy, bool acc, int64_t n0, int64_t n1) {
  const int64_t K = w.cols, nb = K / kQBlock;
  const uint8_t* qw = static_cast<const uint8_t*>(w.data);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = qw + n * w.ld;
    const uint16_t* dr = w.scales + n * nb;
    for (int64_t t = 0; t < a.T; ++t) {
      const int8_t* qx = a.q.data() + t * a.np * 64;
      float s = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        // Separate loops with signed bytes for int8: GCC 12 vectorizes a uint8 load cast to
        // int8 inside a dot product into an unsigned VNNI multiply (wrong sign), seen here.
        int32_t isum = 0;
        if (w.dtype == DType::Int8) {
          const int8_t* qs = reinterpret_cast<const int8_t*>(qr) + b * kQBlock;
          for (int j = 0; j < kQBlock; ++j) isum += static_cast<int32_t>(qs[j]) * qx[b * kQBlock + j];
        } else {
          for (int j = 0; j < kQBlock; ++j)
            isum += (((qr[(b / 2) * 32 + j] >> ((b % 2) * 4)) & 0xF) - 8) * qx[b * kQBlock + j];
        }
        s += static_cast<float>(isum) * a.dx[t * a.np * 2 + b] * f16_to_f32(dr[b]);
      }
      float* o = y + t * ldy + n;
      *o = acc ? *o + s : s;
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kHaveVnni = true;

// RW weight rows x RT tokens. Weight bytes of a pair are unpacked once per row (int8: |q| and
// the sign mask; int4: the 64 nibbles) and reused by every token of the block.
template <bool kInt4, int RW, int RT>
void vnni_kernel(const Weight& w, int64_t n, const QActs& a, int64_t t0, float* y, int64_t ldy, bool accumulate,
                 const float* dw /* [RW][nb + 1] float scales, 0 past the end */) {
  const int64_t nb = w.cols / kQBlock, np = a.np;
  const uint8_t* qw = static_cast<const uint8_t*>(w.data) + n * w.ld;
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
      const __m512i qx = _mm512_loadu_si512(a.q.data() + (tt * np + p) * 64);
      const float* dx2 = a.dx.data() + (tt * np + p) * 2;
      const __m512 dxv = _mm512_insertf32x8(_mm512_set1_ps(dx2[0]), _mm256_set1_ps(dx2[1]), 1);
      __m512i qs;
      if (kInt4) qs = _mm512_slli_epi32(_mm512_loadu_si512(a.qsum.data() + (tt * np + p) * 16), 3);
      for (int r = 0; r < RW; ++r) {
        __m512i dp;
        if (kInt4) {
          dp = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, wv[r], qx), qs);  // sum (q - 8) qx
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
      const float s = _mm512_reduce_add_ps(acc[r][t]);
      float* o = y + (t0 + t) * ldy + n + r;
      *o = accumulate ? *o + s : s;
    }
}

// One token (decode), 8 weight rows at a time: bound by streaming the weights, so the work
// per 64-weight block pair is cut to the bone (about 9 vector ops):
//  int4: one broadcast load of 32 bytes, a per-half shift and a mask give the 64 nibbles
//        (unsigned); dpbusd with the signed activations gives sum q*qx, and the -8 * sum qx
//        term is taken once per row as sum_b dw_b * (8 dx_b sum qx_b) (corr below).
//  int8: activations offset to unsigned (qx + 128, as ux); dpbusd(ux, q) - dpbusd(128, q).
//  The two block scales of a pair reach their 8 lanes each by one permute.
template <bool kInt4>
void vnni_decode(const Weight& w, int64_t n, const QActs& a, const float* corr, float* y, bool accumulate,
                 const float* dw) {
  constexpr int RW = 8;
  const int64_t nb = w.cols / kQBlock, np = a.np;
  const uint8_t* qw = static_cast<const uint8_t*>(w.data) + n * w.ld;
  const __m512i zero = _mm512_setzero_si512(), low4 = _mm512_set1_epi8(0x0F), c128 = _mm512_set1_epi8(-128);
  const __m512i halves = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                          0x0004000400040004, 0, 0, 0, 0);  // per 16-bit lane: 0 low, 4 high half
  const __m512i sel = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[RW];
  for (int r = 0; r < RW; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    const __m512 dxv = _mm512_loadu_ps(a.dxe.data() + p * 16);
    const void* xsrc = kInt4 ? static_cast<const void*>(a.q.data() + p * 64) : static_cast<const void*>(a.ux.data() + p * 64);
    const __m512i xv = _mm512_loadu_si512(xsrc);
    const __mmask64 m = 2 * p + 1 < nb ? ~__mmask64{0} : __mmask64{0xffffffffu};
    for (int r = 0; r < RW; ++r) {
      const uint8_t* src = qw + r * w.ld;
      // The rows two groups on follow these in memory: fetch their line at this offset now,
      // so short rows (1-2 KiB) never wait for the hardware prefetcher to notice them
      // (measured: int4 decode from DRAM 9-10 GB/s without, 16-21 with; never faults).
      if (p % (kInt4 ? 2 : 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + 2 * RW * w.ld + p * (kInt4 ? 32 : 64)), _MM_HINT_T0);
      __m512i dp;
      if (kInt4) {
        const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + p * 32)));
        const __m512i wv = _mm512_and_si512(_mm512_srlv_epi16(b, halves), low4);
        dp = _mm512_dpbusd_epi32(zero, wv, xv);
      } else {
        const __m512i q = _mm512_maskz_loadu_epi8(m, src + p * 64);
        dp = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, xv, q), _mm512_dpbusd_epi32(zero, c128, q));
      }
      const __m512 d2 = _mm512_castpd_ps(_mm512_castpd128_pd512(_mm_load_sd(reinterpret_cast<const double*>(
          dw + r * (nb + 1) + 2 * p))));
      const __m512 dwv = _mm512_permutexvar_ps(sel, d2);
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dp), dxv), dwv, acc[r]);
    }
  }
  for (int r = 0; r < RW; ++r) {
    float s = _mm512_reduce_add_ps(acc[r]);
    if (kInt4) {  // - sum_b dw_b * 8 dx_b sum qx_b
      const float* d = dw + r * (nb + 1);
      __m512 c = _mm512_setzero_ps();
      int64_t b = 0;
      for (; b + 16 <= nb; b += 16) c = _mm512_fmadd_ps(_mm512_loadu_ps(d + b), _mm512_loadu_ps(corr + b), c);
      float cs = _mm512_reduce_add_ps(c);
      for (; b < nb; ++b) cs += d[b] * corr[b];
      s -= cs;
    }
    float* o = y + n + r;
    *o = accumulate ? *o + s : s;
  }
}

template <bool kInt4, int RW>
void vnni_rt(int rt, const Weight& w, int64_t n, const QActs& a, int64_t t0, float* y, int64_t ldy, bool acc,
             const float* dw) {
  switch (rt) {
    case 4: vnni_kernel<kInt4, RW, 4>(w, n, a, t0, y, ldy, acc, dw); break;
    case 3: vnni_kernel<kInt4, RW, 3>(w, n, a, t0, y, ldy, acc, dw); break;
    case 2: vnni_kernel<kInt4, RW, 2>(w, n, a, t0, y, ldy, acc, dw); break;
    default: vnni_kernel<kInt4, RW, 1>(w, n, a, t0, y, ldy, acc, dw); break;
  }
}

template <bool kInt4>
void rows_vnni(const Weight& w, const QActs& a, float* y, int64_t ldy, bool acc, int64_t n0, int64_t n1) {
  const int64_t nb = w.cols / kQBlock;
  // One token (decode) streams 8 rows at once (8 memory streams per core); more tokens
  // reuse each unpacked row 4 times instead.
  const int64_t RW = a.T == 1 ? 8 : 4;
  // float32 scales of the rows in flight, one zero past each row's end (a lone last block)
  std::vector<float> dw_buf(static_cast<size_t>(RW * (nb + 1) + 16), 0.f);
  float* dw = dw_buf.data();
  std::vector<float> corr;  // int4 decode: 8 dx_b sum qx_b per block
  if (kInt4 && a.T == 1) {
    corr.resize(static_cast<size_t>(nb));
    for (int64_t b = 0; b < nb; ++b) {
      int32_t qs = 0;
      for (int i = 0; i < 8; ++i) qs += a.qsum[(b / 2) * 16 + (b % 2) * 8 + i];
      corr[b] = 8.f * a.dx[b] * static_cast<float>(qs);
    }
  }
  for (int64_t n = n0; n < n1; n += RW) {
    const int rw = static_cast<int>(std::min<int64_t>(RW, n1 - n));
    for (int r = 0; r < rw; ++r) {
      const uint16_t* src = w.scales + (n + r) * nb;
      float* dst = dw + r * (nb + 1);
      int64_t b = 0;
      for (; b + 16 <= nb; b += 16)
        _mm512_storeu_ps(dst + b, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b))));
      for (; b < nb; ++b) dst[b] = f16_to_f32(src[b]);
    }
    if (rw == 8) {
      vnni_decode<kInt4>(w, n, a, corr.data(), y, acc, dw);
      continue;
    }
    for (int r0 = 0; r0 < rw; r0 += 4) {  // groups of at most 4 rows
      const int g = std::min(4, rw - r0);
      const float* dwg = dw + r0 * (nb + 1);
      for (int64_t t = 0; t < a.T; t += 4) {
        const int rt = static_cast<int>(std::min<int64_t>(4, a.T - t));
        switch (g) {
          case 4: vnni_rt<kInt4, 4>(rt, w, n + r0, a, t, y, ldy, acc, dwg); break;
          case 3: vnni_rt<kInt4, 3>(rt, w, n + r0, a, t, y, ldy, acc, dwg); break;
          case 2: vnni_rt<kInt4, 2>(rt, w, n + r0, a, t, y, ldy, acc, dwg); break;
          default: vnni_rt<kInt4, 1>(rt, w, n + r0, a, t, y, ldy, acc, dwg); break;
        }
      }
    }
  }
}
#else
constexpr bool kHaveVnni = false;
#endif

int g_forced = -1;  // -1: best; 0: scalar; 1: avx512_vnni
int quant_path() { return g_forced >= 0 ? g_forced : (kHaveVnni ? 1 : 0); }

}  // namespace

const char* quant_matmul_path() { return quant_path() == 1 ? "avx512_vnni" : "scalar"; }

bool set_quant_matmul_path(const std::string& name) {
  if (name.empty() || name == "auto") g_forced = -1;
  else if (name == "scalar") g_forced = 0;
  else if (name == "avx512_vnni" && kHaveVnni) g_forced = 1;
  else return false;
  return true;
}

void matmul_quant(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                  bool accumulate) {
  const QActs a = quantize_acts(x, T, ldx, w.cols);
  const int64_t N = w.rows;
  const int path = quant_path();
  parallel_for((N + 3) / 4, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * 4, n1 = std::min(N, c1 * 4);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (path == 1) {
      if (w.dtype == DType::Int4)
        rows_vnni<true>(w, a, y, ldy, accumulate, n0, n1);
      else
        rows_vnni<false>(w, a, y, ldy, accumulate, n0, n1);
      return;
    }
#endif
    (void)path;
    rows_scalar(w, a, y, ldy, accumulate, n0, n1);
  });
}

}  // namespace gemma
