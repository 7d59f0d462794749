// Quantized formats (quant.h): reference encoders and decoders, the threaded quantizer, and
// the quantized matmul (int8 activations x int8/int4 weights, integer dot products).
#include "cpu/quant.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/quant_kernels.h"
#include "cpu/simd.h"
#include "runtime/threadpool.h"

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
  std::memset(q, 0, static_cast<size_t>(row_bytes(DType::Int4, K)));
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

// ggml's quantize_row_q4_1_ref: d = (max - min) / 15, m = min,
// q = min(15, trunc((x - min) / d + 0.5)). Packed in block pairs as int4 (quant.h).
void quantize_row_int4m_ref(const float* x, int64_t K, uint8_t* q, uint16_t* d, uint16_t* m) {
  const int64_t nb = K / kQBlock;
  std::memset(q, 0, static_cast<size_t>(row_bytes(DType::Int4m, K)));
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQBlock;
    float lo = FLT_MAX, hi = -FLT_MAX;
    for (int j = 0; j < kQBlock; ++j) {
      if (xb[j] < lo) lo = xb[j];
      if (xb[j] > hi) hi = xb[j];
    }
    const float db = (hi - lo) / 15.f, id = db != 0.f ? 1.0f / db : 0.f;
    d[b] = f32_to_f16(db);
    m[b] = f32_to_f16(lo);
    uint8_t* pair = q + (b / 2) * 32;
    const int shift = (b % 2) * 4;
    for (int j = 0; j < kQBlock; ++j) {
      const float v = (xb[j] - lo) * id;
      const int qi = std::min(15, static_cast<int>(static_cast<int8_t>(v + 0.5f)));
      pair[j] = static_cast<uint8_t>(pair[j] | (qi << shift));
    }
  }
}

void dequantize_row(DType f, const uint8_t* q, const uint16_t* d, const uint16_t* m, int64_t K, float* out) {
  for (int64_t b = 0; b < K / kQBlock; ++b) {
    const float db = f16_to_f32(d[b]);
    if (f == DType::Int8) {
      for (int j = 0; j < kQBlock; ++j) out[b * kQBlock + j] = static_cast<float>(static_cast<int8_t>(q[b * kQBlock + j])) * db;
      continue;
    }
    const float mb = f == DType::Int4m ? f16_to_f32(m[b]) : 0.f;
    for (int j = 0; j < kQBlock; ++j) {
      const int v = (q[(b / 2) * 32 + j] >> ((b % 2) * 4)) & 0xF;
      // int4: (q - 8) d, exact. int4m: d q + m, rounded twice (-ffp-contract=off keeps it so).
      out[b * kQBlock + j] = f == DType::Int4 ? static_cast<float>(v - 8) * db : static_cast<float>(v) * db + mb;
    }
  }
}

namespace {
uint16_t u16_at(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// Element j (< 256) of a K-quant super-block's quants (the bytes after its meta).
inline int kquant_q(DType f, const uint8_t* qs, int j) {
  if (f == DType::Q6K) {
    const int h = j / 128, c = (j % 128) / 32, l = j % 32;
    const int lo = (qs[64 * h + 32 * (c % 2) + l] >> (4 * (c / 2))) & 15, hi = (qs[128 + 32 * h + l] >> (2 * c)) & 3;
    return lo | (hi << 4);
  }
  const int s = j / 32, l = j % 32;
  int q = (qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 15;
  if (f == DType::Q5K) q |= ((qs[128 + l] >> s) & 1) << 4;
  return q;
}
}  // namespace

void dequantize_row_kquant(DType f, const uint8_t* row, int64_t K, float* out) {
  const int64_t B = format_info(f).block_bytes;
  for (int64_t sb = 0; sb < K / kQSuper; ++sb, row += B, out += kQSuper) {
    const float d = f16_to_f32(u16_at(row));
    const uint8_t* qs = row + kQMeta;
    if (f == DType::Q6K) {
      const int8_t* sc = reinterpret_cast<const int8_t*>(row + 4);
      for (int j = 0; j < kQSuper; ++j) out[j] = d * static_cast<float>(sc[j / 16]) * static_cast<float>(kquant_q(f, qs, j) - 32);
      continue;
    }
    const float dmin = f16_to_f32(u16_at(row + 2));
    for (int j = 0; j < kQSuper; ++j) {
      const float d1 = d * static_cast<float>(row[4 + j / 32]), m1 = dmin * static_cast<float>(row[12 + j / 32]);
      out[j] = d1 * static_cast<float>(kquant_q(f, qs, j)) - m1;  // two roundings, as ggml
    }
  }
}

namespace {
// One group of 16 rows (or the plain tail): 4-byte quant words and 2-byte scales move
// between row order and the interleaved order of quant.h.
void interleave_group(int64_t qb, int64_t nb, const uint8_t* q, const uint16_t* d, const uint16_t* m, uint8_t* qo,
                      uint16_t* dout, uint16_t* mout, bool to_groups) {
  const int64_t words = qb / 4;
  for (int64_t r = 0; r < kQGroup; ++r) {
    for (int64_t c = 0; c < words; ++c) {
      const int64_t plain = r * qb + c * 4, grouped = c * 64 + r * 4;
      std::memcpy(qo + (to_groups ? grouped : plain), q + (to_groups ? plain : grouped), 4);
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t plain = r * nb + b, grouped = b * kQGroup + r;
      dout[to_groups ? grouped : plain] = d[to_groups ? plain : grouped];
      if (m) mout[to_groups ? grouped : plain] = m[to_groups ? plain : grouped];
    }
  }
}
}  // namespace

void interleave_rows(int64_t rows, int64_t qb, int64_t nb, const uint8_t* q, const uint16_t* d, const uint16_t* m,
                     uint8_t* qo, uint16_t* dout, uint16_t* mout, bool to_groups) {
  const int64_t full = grouped_rows(rows);
  parallel_for(full / kQGroup, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      interleave_group(qb, nb, q + g * kQGroup * qb, d + g * kQGroup * nb, m ? m + g * kQGroup * nb : nullptr,
                       qo + g * kQGroup * qb, dout + g * kQGroup * nb, m ? mout + g * kQGroup * nb : nullptr, to_groups);
  });
  std::memcpy(qo + full * qb, q + full * qb, static_cast<size_t>((rows - full) * qb));
  if (d) std::memcpy(dout + full * nb, d + full * nb, static_cast<size_t>((rows - full) * nb) * 2);
  if (m) std::memcpy(mout + full * nb, m + full * nb, static_cast<size_t>((rows - full) * nb) * 2);
}

void gather_row(const QMatrix& w, int64_t r, uint8_t* q, uint16_t* d, uint16_t* m) {
  if (r >= grouped_rows(w.rows)) {
    std::memcpy(q, w.q + r * w.qb, static_cast<size_t>(w.qb));
    if (w.d) std::memcpy(d, w.d + r * w.nb, static_cast<size_t>(w.nb) * 2);
    if (w.m) std::memcpy(m, w.m + r * w.nb, static_cast<size_t>(w.nb) * 2);
    return;
  }
  const int64_t g = r / kQGroup, i = r % kQGroup;
  const uint8_t* qg = w.q + g * kQGroup * w.qb;
  for (int64_t c = 0; c < w.qb / 4; ++c) std::memcpy(q + c * 4, qg + c * 64 + i * 4, 4);
  for (int64_t b = 0; b < w.nb; ++b) {
    d[b] = w.d[g * kQGroup * w.nb + b * kQGroup + i];
    if (w.m) m[b] = w.m[g * kQGroup * w.nb + b * kQGroup + i];
  }
}

void quantize_matrix(DType f, const void* src, bool src_bf16, int64_t rows, int64_t K, uint8_t* q,
                     uint16_t* d, uint16_t* m) {
  const int64_t qb = row_bytes(f, K), nb = scale_row_count(K), full = grouped_rows(rows);
  parallel_for((rows + kQGroup - 1) / kQGroup, [&](int64_t g0, int64_t g1) {
    std::vector<float> row(static_cast<size_t>(K));
    // A whole group is quantized in row order here, then interleaved into place.
    std::vector<uint8_t> gq(static_cast<size_t>(kQGroup * qb));
    std::vector<uint16_t> gd(static_cast<size_t>(kQGroup * nb)), gm(static_cast<size_t>(kQGroup * nb));
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * kQGroup, r1 = std::min(rows, r0 + kQGroup);
      const bool grouped = r1 <= full;
      for (int64_t r = r0; r < r1; ++r) {
        const float* x;
        if (src_bf16) {
          const uint16_t* s = static_cast<const uint16_t*>(src) + r * K;
          for (int64_t k = 0; k < K; ++k) row[k] = bf16_to_f32(s[k]);
          x = row.data();
        } else {
          x = static_cast<const float*>(src) + r * K;
        }
        uint8_t* qr = grouped ? gq.data() + (r - r0) * qb : q + r * qb;
        uint16_t* dr = grouped ? gd.data() + (r - r0) * nb : d + r * nb;
        uint16_t* mr = grouped ? gm.data() + (r - r0) * nb : (m ? m + r * nb : nullptr);
        if (f == DType::Int8)
          quantize_row_int8_ref(x, K, reinterpret_cast<int8_t*>(qr), dr);
        else if (f == DType::Int4)
          quantize_row_int4_ref(x, K, qr, dr);
        else
          quantize_row_int4m_ref(x, K, qr, dr, mr);
      }
      if (grouped)
        interleave_group(qb, nb, gq.data(), gd.data(), f == DType::Int4m ? gm.data() : nullptr, q + r0 * qb,
                         d + r0 * nb, f == DType::Int4m ? m + r0 * nb : nullptr, true);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Quantized matmul. (The SIMD kernels live in quant_avx512.cpp and quant_avx2.cpp.)
//
// Activations: each token row is quantized per block of 32 to int8 with scale
// dx = amax / 127 and q = nearest-even(x * 127 / amax), laid out in block pairs of 64 bytes
// (a lone last block pairs with zeros). With the weights' block pairs this gives, per pair,
// one 64-byte integer dot product whose 16 int32 lanes hold 4 products each: lanes 0-7
// belong to block 2p, lanes 8-15 to block 2p + 1, scaled by dx * dw of their block.
//
// Weights with an offset, w = d q + o per block (int4: o = -8 d; int4m: o = m; and int8
// decode, which flips its weights to q + 128: o = -128 d), take the dot product of the
// unsigned q and add sum_b o_b * xsum_b once per row and token, xsum_b = dx_b * sum of
// block b's q: one nb-long dot product instead of work in every block pair.
namespace {

struct QActs {
  int64_t T = 0, np = 0;
  std::vector<int8_t> q;      // [T][np * 64]
  std::vector<float> dx;      // [T][np * 2]: the block scales
  std::vector<float> xsum;    // [T][np * 2]: dx_b * sum of block b's q (the offsets' term)
  std::vector<int16_t> bsum16;  // [T][np * 4]: the sum of each half block's q (K-quants)
  QActView view() const { return {T, np, q.data(), dx.data(), xsum.data(), bsum16.data()}; }
};

// Quantizes into the calling thread's buffers (reused from call to call: decode calls this
// ~10 times per layer on short rows, where allocations would show).
const QActs& quantize_acts(const float* x, int64_t T, int64_t ldx, int64_t K) {
  thread_local QActs buffers;
  // A named reference, so that the pool's threads below write the caller's buffers: a lambda
  // naming the thread_local itself would reach each worker's own (empty) instance.
  QActs& a = buffers;
  const int64_t nb = K / kQBlock;
  a.T = T;
  a.np = (nb + 1) / 2;
  a.q.assign(static_cast<size_t>(T * a.np * 64), 0);
  a.dx.assign(static_cast<size_t>(T * a.np * 2), 0.f);
  a.xsum.assign(static_cast<size_t>(T * a.np * 2), 0.f);
  a.bsum16.assign(static_cast<size_t>(T * a.np * 4), 0);
  auto row = [&](int64_t t) {
    const float* xr = x + t * ldx;
    int8_t* q = a.q.data() + t * a.np * 64;
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.f;
      for (int j = 0; j < kQBlock; ++j) amax = std::max(amax, std::fabs(xr[b * kQBlock + j]));
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      a.dx[t * a.np * 2 + b] = amax / 127.f;
      int32_t half[2] = {0, 0};
      for (int j = 0; j < kQBlock; ++j) {
        const float v = std::nearbyint(xr[b * kQBlock + j] * id);
        q[b * kQBlock + j] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, v)));
        half[j / 16] += q[b * kQBlock + j];
      }
      a.bsum16[t * a.np * 4 + 2 * b] = static_cast<int16_t>(half[0]);
      a.bsum16[t * a.np * 4 + 2 * b + 1] = static_cast<int16_t>(half[1]);
      a.xsum[t * a.np * 2 + b] = a.dx[t * a.np * 2 + b] * static_cast<float>(half[0] + half[1]);
    }
  };
  if (T * K < (int64_t{1} << 16)) {
    for (int64_t t = 0; t < T; ++t) row(t);
  } else {
    parallel_for(T, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) row(t);
    });
  }
  return a;
}

// The scalar path: integer dot product per block, scaled per block. The reference the SIMD
// path is tested against (both against float64 with a bound in the tests). Both row orders
// of quant.h, read in place: a plain row's block is 32 bytes in a row; in an interleaved
// group, the 16 rows of a block are 8 lines of [16 rows][4 bytes], taken a line at a time
// for all 16 rows (loops the compiler can vectorize, as it did the plain rows').
template <bool kInt8>
inline void line_dot(const uint8_t* line, int shift, const int8_t* x, int32_t* isum /* [16] */) {
  for (int i = 0; i < 16; ++i)
    for (int e = 0; e < 4; ++e) {
      const int32_t q = kInt8 ? static_cast<int32_t>(reinterpret_cast<const int8_t*>(line)[4 * i + e])
                              : (line[4 * i + e] >> shift) & 0xF;
      isum[i] += q * x[e];
    }
}

void rows_scalar(const Weight& w, const QActs& a, float* y, int64_t ldy, bool acc, int64_t n0, int64_t n1) {
  const int64_t K = w.cols, nb = K / kQBlock, full = grouped_rows(w.rows);
  const bool int8 = w.dtype == DType::Int8;
  const uint8_t* qw = static_cast<const uint8_t*>(w.data);
  // The block's offset o (w = d q + o): m for int4m, -8 d for int4 (none for int8).
  auto offset = [&](int64_t idx, float db) { return w.dtype == DType::Int4m ? f16_to_f32(w.mins[idx]) : -8.f * db; };
  int64_t n = n0;
  for (; n < n1 && n < full; n += kQGroup) {  // whole groups (n is a group's first row here)
    const uint8_t* qg = qw + n * w.ld;
    for (int64_t t = 0; t < a.T; ++t) {
      const int8_t* qx = a.q.data() + t * a.np * 64;
      float s[kQGroup] = {};
      for (int64_t b = 0; b < nb; ++b) {
        int32_t isum[kQGroup] = {};
        for (int64_t c = 0; c < 8; ++c) {
          const int8_t* x = qx + b * kQBlock + 4 * c;
          if (int8)
            line_dot<true>(qg + (8 * b + c) * 64, 0, x, isum);
          else
            line_dot<false>(qg + (8 * (b / 2) + c) * 64, (b % 2) * 4, x, isum);
        }
        const int64_t sb = n * nb + b * kQGroup;  // the group's block b: [16 rows]
        for (int64_t i = 0; i < kQGroup; ++i) {
          const float db = f16_to_f32(w.scales[sb + i]);
          s[i] += static_cast<float>(isum[i]) * a.dx[t * a.np * 2 + b] * db;
          if (!int8) s[i] += offset(sb + i, db) * a.xsum[t * a.np * 2 + b];
        }
      }
      for (int64_t i = 0; i < kQGroup; ++i) {
        float* o = y + t * ldy + n + i;
        *o = acc ? *o + s[i] : s[i];
      }
    }
  }
  for (; n < n1; ++n) {  // plain rows
    const uint8_t* qr = qw + n * w.ld;
    const uint16_t* dr = w.scales + n * nb;
    for (int64_t t = 0; t < a.T; ++t) {
      const int8_t* qx = a.q.data() + t * a.np * 64;
      float s = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        // Separate loops with signed bytes for int8: GCC 12 vectorizes a uint8 load cast to
        // int8 inside a dot product into an unsigned VNNI multiply (wrong sign), seen here.
        int32_t isum = 0;
        const float db = f16_to_f32(dr[b]);
        if (int8) {
          const int8_t* qs = reinterpret_cast<const int8_t*>(qr) + b * kQBlock;
          for (int j = 0; j < kQBlock; ++j) isum += static_cast<int32_t>(qs[j]) * qx[b * kQBlock + j];
        } else {  // int4, int4m: sum q qx with the unsigned q, then the offset's term
          for (int j = 0; j < kQBlock; ++j)
            isum += ((qr[(b / 2) * 32 + j] >> ((b % 2) * 4)) & 0xF) * qx[b * kQBlock + j];
          s += offset(n * nb + b, db) * a.xsum[t * a.np * 2 + b];
        }
        s += static_cast<float>(isum) * a.dx[t * a.np * 2 + b] * db;
      }
      float* o = y + t * ldy + n;
      *o = acc ? *o + s : s;
    }
  }
}

// One K-quant row (plain order) . one token's activations, the scalar reference of the SIMD
// kernels: per activation block b (32 values) an exact integer sum, the sub-blocks' scales
// sc applied in integers, then scaled by d dx_b; q4_k / q5_k take their mins' term
// sum_b (dmin m_b) xsum_b apart, q6_k its -32 through the half blocks' sums of q.
float kquant_dot_scalar(DType f, const uint8_t* row, int64_t K, const QActs& a, int64_t t) {
  const int8_t* qx = a.q.data() + t * a.np * 64;
  const float* dx = a.dx.data() + t * a.np * 2;
  const int64_t B = format_info(f).block_bytes;
  float acc = 0.f, off = 0.f;
  for (int64_t sb = 0; sb < K / kQSuper; ++sb, row += B) {
    const float d = f16_to_f32(u16_at(row));
    const uint8_t* qs = row + kQMeta;
    for (int s = 0; s < 8; ++s) {  // activation block b = 8 sb + s
      const int64_t b = 8 * sb + s;
      const int8_t* x = qx + b * kQBlock;
      int32_t isum = 0;
      if (f == DType::Q6K) {
        const int8_t* sc = reinterpret_cast<const int8_t*>(row + 4);
        for (int h = 0; h < 2; ++h) {
          int32_t part = 0;
          for (int l = 0; l < 16; ++l) part += (kquant_q(f, qs, 32 * s + 16 * h + l) - 32) * x[16 * h + l];
          isum += sc[2 * s + h] * part;
        }
      } else {
        for (int l = 0; l < kQBlock; ++l) isum += kquant_q(f, qs, 32 * s + l) * x[l];
        isum *= row[4 + s];
        off += f16_to_f32(u16_at(row + 2)) * static_cast<float>(row[12 + s]) * a.xsum[t * a.np * 2 + b];
      }
      acc += static_cast<float>(isum) * (d * dx[b]);
    }
  }
  return acc - off;
}

// Rows [n0, n1) of a K-quant matrix on the scalar path, any row order (rows gathered plain).
void kquant_rows_scalar(const Weight& w, const QActs& a, float* y, int64_t ldy, bool acc, int64_t n0, int64_t n1) {
  const DType f = w.dtype;
  thread_local std::vector<uint8_t> row;
  row.resize(static_cast<size_t>(w.ld));
  for (int64_t n = n0; n < n1; ++n) {
    gather_row(QMatrix{static_cast<const uint8_t*>(w.data), nullptr, nullptr, w.rows, w.ld, 0}, n, row.data(), nullptr,
               nullptr);
    for (int64_t t = 0; t < a.T; ++t) {
      const float s = kquant_dot_scalar(f, row.data(), w.cols, a, t);
      float* o = y + t * ldy + n;
      *o = acc ? *o + s : s;
    }
  }
}

// Paths, best last. Chosen once, at first use, from what this CPU supports (and what this
// build compiled: GEMMA_QUANT_AVX512 / GEMMA_QUANT_AVX2 come from CMakeLists.txt).
enum QPath { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };
const char* kQPathNames[] = {"scalar", "avx2", "avx512_vnni"};

bool cpu_has(int path) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (path == kAvx512Vnni) {
#ifdef GEMMA_QUANT_AVX512
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#endif
  }
  if (path == kAvx2) {
#ifdef GEMMA_QUANT_AVX2
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  }
#endif
  return path == kScalar;
}

int best_path() {
  static const int best = cpu_has(kAvx512Vnni) ? kAvx512Vnni : cpu_has(kAvx2) ? kAvx2 : kScalar;
  return best;
}
int g_forced = -1;  // tests pin a path
int quant_path() { return g_forced >= 0 ? g_forced : best_path(); }

}  // namespace

const char* quant_matmul_path() { return kQPathNames[quant_path()]; }

bool set_quant_matmul_path(const std::string& name) {
  if (name.empty() || name == "auto") {
    g_forced = -1;
    return true;
  }
  for (int p = 0; p < 3; ++p)
    if (name == kQPathNames[p] && cpu_has(p)) {
      g_forced = p;
      return true;
    }
  return false;
}

namespace {
// Rows [n0, n1) of y = x . w^T on the best path, from activations quantized once. n0 is a
// multiple of 16 (the interleaved groups of quant.h) or past the last whole group.
void quant_rows(const Weight& w, const QActs& a, const QActView& av, float* y, int64_t ldy, bool accumulate,
                int64_t n0, int64_t n1) {
  if (n0 >= n1) return;
  if (w.kquant()) {
    // The whole 16-row groups on the path's SIMD kernel, the plain tail rows on the scalar one.
    const KQWeightView kv{static_cast<const uint8_t*>(w.data), w.rows, w.cols, w.ld, w.dtype};
    (void)kv;
#ifdef GEMMA_QUANT_AVX512
    if (quant_path() == kAvx512Vnni) n0 = kquant_groups_avx512vnni(kv, av, y, ldy, accumulate, n0, n1);
#endif
#ifdef GEMMA_QUANT_AVX2
    if (quant_path() == kAvx2) n0 = kquant_groups_avx2(kv, av, y, ldy, accumulate, n0, n1);
#endif
    return kquant_rows_scalar(w, a, y, ldy, accumulate, n0, n1);
  }
#if defined(GEMMA_QUANT_AVX512) || defined(GEMMA_QUANT_AVX2)
  const QWeightView wv{static_cast<const uint8_t*>(w.data), w.scales, w.dtype == DType::Int4m ? w.mins : nullptr,
                       w.rows, w.cols, w.ld, w.dtype != DType::Int8};
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(16 * (w.cols / kQBlock + 1) + 16));
  const int path = quant_path();
#endif
#ifdef GEMMA_QUANT_AVX512
  if (path == kAvx512Vnni) return quant_rows_avx512vnni(wv, av, y, ldy, accumulate, n0, n1, scratch.data());
#endif
#ifdef GEMMA_QUANT_AVX2
  if (path == kAvx2) return quant_rows_avx2(wv, av, y, ldy, accumulate, n0, n1, scratch.data());
#endif
  rows_scalar(w, a, y, ldy, accumulate, n0, n1);
}
}  // namespace

namespace {
// Prefill (many tokens) is bound by multiplies, not by reading W: where AMX exists its bf16
// tiles outrun integer dot products ~4x, so the weights are dequantized into them. Decode
// stays on the integer kernels at any batch size: they read 4-8x fewer bytes than bf16, and
// they give a row the same bits whatever rows share the step (AMX adds in another order).
constexpr int64_t kAmxMinTokens = 16;
bool takes_amx(int64_t T, Work work) { return work == Work::Prefill && T >= kAmxMinTokens && g_forced < 0; }
bool takes_amx(int64_t T, Work work, const Weight& w) { return !w.kquant() && takes_amx(T, work); }
}  // namespace

namespace {
// The integer kernels over all of w's rows: x quantized once, groups of 16 rows on the pool.
void integer_matmul(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy, bool accumulate) {
  const QActs& a = quantize_acts(x, T, ldx, w.cols);
  const QActView av = a.view();
  const int64_t N = w.rows;
  parallel_for((N + kQGroup - 1) / kQGroup, [&](int64_t c0, int64_t c1) {
    quant_rows(w, a, av, y, ldy, accumulate, c0 * kQGroup, std::min(N, c1 * kQGroup));
  });
}
}  // namespace

void matmul_quant(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                  bool accumulate, Work work) {
  // (K-quants stay on the integer kernels: AMX has no dequantizer for them yet.)
  const int64_t done = takes_amx(T, work, w) ? matmul_quant_amx(x, T, ldx, w, y, ldy, accumulate) : 0;
  if (done == 0) return integer_matmul(x, T, ldx, w, y, ldy, accumulate);
  if (done == w.rows) return;
  Weight rest = w;  // the rows AMX left (fewer than 32), or all of them
  rest.data = static_cast<const uint8_t*>(w.data) + done * w.ld;
  rest.scales = w.scales + done * (w.cols / kQBlock);
  if (w.mins) rest.mins = w.mins + done * (w.cols / kQBlock);
  rest.rows = w.rows - done;
  integer_matmul(x, T, ldx, rest, y + done, ldy, accumulate);
}

bool matmul_quant_many(const float* x, int64_t T, int64_t ldx, const MatmulTarget* outs, int n, Work work) {
  constexpr int kMaxTargets = 8;
  if (n <= 0 || n > kMaxTargets) return false;
  for (int i = 0; i < n; ++i)
    if (!outs[i].w->quantized() || outs[i].w->cols != outs[0].w->cols || outs[i].accumulate ||
        takes_amx(T, work, *outs[i].w))
      return false;
  const QActs& a = quantize_acts(x, T, ldx, outs[0].w->cols);
  const QActView av = a.view();
  // Chunks of 16 rows (one interleaved group) of every matrix, one after the other: one pass
  // of the pool for all.
  int64_t start[kMaxTargets + 1] = {0};
  for (int i = 0; i < n; ++i) start[i + 1] = start[i] + (outs[i].w->rows + kQGroup - 1) / kQGroup;
  parallel_for(start[n], [&](int64_t c0, int64_t c1) {
    for (int i = 0; i < n; ++i) {
      const int64_t b = std::max(c0, start[i]), e = std::min(c1, start[i + 1]);
      if (b >= e) continue;
      const Weight& w = *outs[i].w;
      quant_rows(w, a, av, outs[i].y, outs[i].ldy, false, (b - start[i]) * kQGroup,
                 std::min(w.rows, (e - start[i]) * kQGroup));
    }
  });
  return true;
}

}  // namespace gemma
