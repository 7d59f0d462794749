// bf16-weight matmul: y[T, N] = bf16(x)[T, K] . W[N, K]^T, float32 accumulation.
//
// With bf16 weights the matmul inputs are rounded to bf16 too (as transformers does in
// bf16), so the products run on bf16 dot-product hardware: AMX tiles (TDPBF16PS, 16x16x32
// per instruction) where the CPU and kernel allow them, else AVX512-BF16 (VDPBF16PS), else
// the generic float32 kernel on the widened values. Every path computes each output from
// its own weight row and token row only, so a row's result does not depend on the batch.
//
// AMX layout. We compute C^T = W . X^T so that W is the A operand as it lies in memory
// (16 rows of n x 32 k = 64 bytes per row, stride K*2), and x is packed once per call into
// B tiles in the VNNI layout: for a 16-token block and a 32-wide k block, 16 rows of k pairs
// x 16 tokens x 2 bf16 = 1 KiB contiguous. A micro-tile is 32 n x 32 t: 2 A tiles, 2 B
// tiles, 4 C accumulator tiles (all 8 AMX tile registers).
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/quant.h"
#include "cpu/simd.h"
#include "runtime/threadpool.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define GEMMA_HAVE_AMX 1
#endif

namespace gemma {

void matmul_generic_bf16(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y,
                         int64_t ldy, bool accumulate);  // matmul.cpp

namespace {

// Rounds n floats to bf16 (nearest even). With AVX512-BF16 this is VCVTNE2PS2BF16, which
// also flushes denormal inputs to zero: the same rounding on every bf16 path below.
inline void to_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t k = 0;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  for (; k + 32 <= n; k += 32)
    _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(x + k)));
  if (k < n) {
    const __mmask16 lo = static_cast<__mmask16>(n - k >= 16 ? 0xffff : (1u << (n - k)) - 1);
    const __mmask16 hi = static_cast<__mmask16>(n - k <= 16 ? 0 : (1u << (n - k - 16)) - 1);
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + k + 16), _mm512_maskz_loadu_ps(lo, x + k));
    _mm512_mask_storeu_epi16(out + k, static_cast<__mmask32>((uint64_t{1} << (n - k)) - 1), (__m512i)v);
  }
#else
  for (; k < n; ++k) out[k] = f32_to_bf16(x[k]);
#endif
}

// Runs fn(t) for every token row, in parallel when the rows are worth it.
template <typename Fn>
void for_rows(int64_t T, int64_t K, Fn fn) {
  if (T * K < (int64_t{1} << 16)) {
    for (int64_t t = 0; t < T; ++t) fn(t);
  } else {
    parallel_for(T, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) fn(t);
    });
  }
}

// x rows rounded to bf16, K padded with zeros to a multiple of 32.
std::vector<uint16_t> round_rows(const float* x, int64_t T, int64_t ldx, int64_t K, int64_t Kp) {
  std::vector<uint16_t> xb(static_cast<size_t>(T * Kp), 0);
  for_rows(T, K, [&](int64_t t) { to_bf16(x + t * ldx, K, xb.data() + t * Kp); });
  return xb;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool kHaveDpBf16 = true;

template <int RW, int RT>
inline void dp_kernel(const uint16_t* w, int64_t ldw, const uint16_t* xb, int64_t Kp, int64_t K,
                      float* y, int64_t ldy, bool accumulate) {
  __m512 acc[RW][RT];
  for (int r = 0; r < RW; ++r)
    for (int t = 0; t < RT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    // The weight row ends at K (it may be the last bytes of a memory map): mask the tail.
    const __mmask32 m = K - k >= 32 ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
    __m512bh xv[RT];
    for (int t = 0; t < RT; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(xb + t * Kp + k);
    for (int r = 0; r < RW; ++r) {
      // Decode (one token, 8 rows): fetch the same line of the rows two groups on, which
      // follow in memory, before the hardware prefetcher would; prefetches never fault.
      if (RT == 1 && RW == 8) _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * RW) * ldw + k), _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * ldw + k);
      for (int t = 0; t < RT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int t = 0; t < RT; ++t) {
      const float s = _mm512_reduce_add_ps(acc[r][t]);
      float* out = y + t * ldy + r;
      *out = accumulate ? *out + s : s;
    }
}

template <int RW>
inline void dp_rt(int rt, const uint16_t* w, int64_t ldw, const uint16_t* xb, int64_t Kp, int64_t K,
                  float* y, int64_t ldy, bool acc) {
  switch (rt) {
    case 4: dp_kernel<RW, 4>(w, ldw, xb, Kp, K, y, ldy, acc); break;
    case 3: dp_kernel<RW, 3>(w, ldw, xb, Kp, K, y, ldy, acc); break;
    case 2: dp_kernel<RW, 2>(w, ldw, xb, Kp, K, y, ldy, acc); break;
    default: dp_kernel<RW, 1>(w, ldw, xb, Kp, K, y, ldy, acc); break;
  }
}

// Rows [n0, n1) of y for all T tokens with VDPBF16PS; register blocks of 4 rows x 4 tokens.
void dp_rows(const uint16_t* w, int64_t ldw, const uint16_t* xb, int64_t T, int64_t Kp, int64_t K,
             float* y, int64_t ldy, bool acc, int64_t n0, int64_t n1) {
  if (T == 1) {
    // One token (decode): eight weight rows at a time, eight memory streams per core.
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) dp_kernel<8, 1>(w + n * ldw, ldw, xb, Kp, K, y + n, ldy, acc);
    for (; n < n1; ++n) dp_kernel<1, 1>(w + n * ldw, ldw, xb, Kp, K, y + n, ldy, acc);
    return;
  }
  constexpr int64_t NB = 32;  // weight rows per L1/L2-resident panel
  for (int64_t nb = n0; nb < n1; nb += NB) {
    const int64_t nb_end = std::min(n1, nb + NB);
    for (int64_t t = 0; t < T; t += 4) {
      const int rt = static_cast<int>(std::min<int64_t>(4, T - t));
      for (int64_t n = nb; n < nb_end; n += 4) {
        const int rw = static_cast<int>(std::min<int64_t>(4, nb_end - n));
        const uint16_t* wp = w + n * ldw;
        const uint16_t* xp = xb + t * Kp;
        float* yp = y + t * ldy + n;
        switch (rw) {
          case 4: dp_rt<4>(rt, wp, ldw, xp, Kp, K, yp, ldy, acc); break;
          case 3: dp_rt<3>(rt, wp, ldw, xp, Kp, K, yp, ldy, acc); break;
          case 2: dp_rt<2>(rt, wp, ldw, xp, Kp, K, yp, ldy, acc); break;
          default: dp_rt<1>(rt, wp, ldw, xp, Kp, K, yp, ldy, acc); break;
        }
      }
    }
  }
}
#else
constexpr bool kHaveDpBf16 = false;
#endif

#ifdef GEMMA_HAVE_AMX
// Linux hands out AMX tile state only to processes that ask (arch_prctl); asked once.
bool amx_usable() {
  static const bool ok = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0-3 C (16 n x 16 t f32), 4-5 A (16 n x 32 k bf16), 6-7 B (16 k-pairs x 16 t x 2).
void load_tile_config() {
  TileConfig c;
  for (int i = 0; i < 8; ++i) {
    c.rows[i] = 16;
    c.colsb[i] = 64;
  }
  _tile_loadconfig(&c);
}

// x [T, K] -> B tiles: for token block tb and k block kb, 1 KiB at ((tb * KB) + kb) * 512
// uint16: row p (k pair), column t: x[tb*16 + t][kb*32 + 2p + {0, 1}]. Padding tokens are 0.
// One token's 32 bf16 of a k block are 16 k pairs: a column of the tile, scattered.
std::vector<uint16_t> pack_vnni(const float* x, int64_t T, int64_t ldx, int64_t K) {
  const int64_t TB = (T + 15) / 16, KB = K / 32;
  std::vector<uint16_t> p(static_cast<size_t>(TB * KB * 512), 0);
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  for_rows(T, K, [&](int64_t t) {
    const float* xr = x + t * ldx;
    uint16_t* base = p.data() + (t / 16) * KB * 512 + (t % 16) * 2;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + kb * 32 + 16), _mm512_loadu_ps(xr + kb * 32));
      _mm512_i32scatter_epi32(base + kb * 512, column, v, 4);
    }
  });
  return p;
}

// out[j] = column j of the row-major 16x16 block m: four rounds of in-lane and
// cross-lane shuffles (64 shuffles), instead of 256 scalar moves.
inline void transpose16x16(const float* m, __m512 out[16]) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(m + 16 * i);
  for (int i = 0; i < 16; i += 2) {  // t: pairs of rows interleaved within 128-bit lanes
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + c], lane l: rows g..g+3 of column 4l + c
    r[g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
    r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
    r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
    r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
  }
  for (int c = 0; c < 4; ++c) {  // t[c]: columns c, c+8; t[c+4]: columns c+4, c+12 (rows 0-7)
    t[c] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0x88);
    t[c + 4] = _mm512_shuffle_f32x4(r[c], r[c + 4], 0xdd);
    t[c + 8] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0x88);
    t[c + 12] = _mm512_shuffle_f32x4(r[c + 8], r[c + 12], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    out[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    out[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xdd);
    out[c + 4] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0x88);
    out[c + 12] = _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0xdd);
  }
}

// 32 bf16 weights of one row's k block kb into dst, dequantized from the row's 32 quant bytes
// of the block (int4/int4m: of its block pair) in plain order: int8 d q, int4/int4m d q + o
// with the unsigned nibble q and the block's offset o (-8 d, or m), then rounded to bf16 like
// the activations. d q + o is a product and a sum, each rounded (-ffp-contract=off), as
// quant.h's dequantize_row: for int4 both are exact, so this is (q - 8) d.
inline void block_bf16(DType dt, const uint8_t* bytes, int64_t kb, float ds, float o_m, uint16_t* dst) {
  const __m512 d = _mm512_set1_ps(ds);
  __m512 flo, fhi;
  if (dt == DType::Int8) {
    const __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    const __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16)));
    flo = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d);
    fhi = _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d);
  } else {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
    if (kb % 2) b = _mm256_srli_epi16(b, 4);
    b = _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
    const __m512 o = _mm512_set1_ps(dt == DType::Int4m ? o_m : -8.f * ds);
    const __m512i lo = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(b));
    const __m512i hi = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(b, 1));
    flo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), o);
    fhi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), o);
  }
  _mm512_store_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(fhi, flo));
}

// Rows [row, row + 16) of k block kb into dst (row i at dst + 32 i): bf16 copied, or
// dequantized (block_bf16) from plain rows or from one interleaved group (quant.h), whose 8
// lines of the block (16 rows x 4 bytes each) are transposed into the rows' 32 bytes first.
void rows16_bf16(const Weight& wt, int64_t row, int64_t kb, uint16_t* dst) {
  if (wt.dtype == DType::BF16) {
    for (int i = 0; i < 16; ++i)
      _mm512_store_si512(dst + 32 * i,
                         _mm512_loadu_si512(static_cast<const uint16_t*>(wt.data) + (row + i) * wt.ld + kb * 32));
    return;
  }
  const int64_t nb = wt.cols / 32, line0 = (wt.dtype == DType::Int8 ? kb : kb / 2) * 8;
  const uint8_t* q = static_cast<const uint8_t*>(wt.data);
  auto one = [&](int64_t i, const uint8_t* bytes, int64_t blk) {
    block_bf16(wt.dtype, bytes, kb, _cvtsh_ss(wt.scales[blk]), wt.dtype == DType::Int4m ? _cvtsh_ss(wt.mins[blk]) : 0.f,
               dst + 32 * i);
  };
  if (row + 16 > grouped_rows(wt.rows)) {  // plain rows
    for (int64_t i = 0; i < 16 && row + i < wt.rows; ++i) one(i, q + (row + i) * wt.ld + line0 * 4, (row + i) * nb + kb);
    return;
  }
  const uint8_t* base = q + row * wt.ld + line0 * 64;  // row is a group's first row
  __m512i L[8], A[8], B[8];
  for (int c = 0; c < 8; ++c) L[c] = _mm512_loadu_si512(base + 64 * c);
  // Dword transpose: per 128-bit lane j, A[2a + e] ends with rows 4j + (2e or 2e + 1)...
  for (int c = 0; c < 8; c += 2) {
    A[c] = _mm512_unpacklo_epi32(L[c], L[c + 1]);      // lane j: L_c[4j], L_c+1[4j], L_c[4j+1], L_c+1[4j+1]
    A[c + 1] = _mm512_unpackhi_epi32(L[c], L[c + 1]);  // ... [4j+2], [4j+3]
  }
  // B[h * 4 + a]: lane j holds row 4j + a, lines 4h..4h+3.
  for (int h = 0; h < 2; ++h) {
    B[h * 4 + 0] = _mm512_unpacklo_epi64(A[4 * h], A[4 * h + 2]);
    B[h * 4 + 1] = _mm512_unpackhi_epi64(A[4 * h], A[4 * h + 2]);
    B[h * 4 + 2] = _mm512_unpacklo_epi64(A[4 * h + 1], A[4 * h + 3]);
    B[h * 4 + 3] = _mm512_unpackhi_epi64(A[4 * h + 1], A[4 * h + 3]);
  }
  // Row 4j + a = lane j of B[a] (lines 0-3), then lane j of B[4 + a] (lines 4-7).
  const __m512i lo_rows = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), hi_rows = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  alignas(64) uint8_t rows[16][32];
  for (int a = 0; a < 4; ++a) {
    const __m512i r01 = _mm512_permutex2var_epi64(B[a], lo_rows, B[4 + a]);  // rows a, 4 + a
    const __m512i r23 = _mm512_permutex2var_epi64(B[a], hi_rows, B[4 + a]);  // rows 8 + a, 12 + a
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[a]), _mm512_castsi512_si256(r01));
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[4 + a]), _mm512_extracti64x4_epi64(r01, 1));
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[8 + a]), _mm512_castsi512_si256(r23));
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows[12 + a]), _mm512_extracti64x4_epi64(r23, 1));
  }
  const int64_t s0 = row * nb + kb * kQGroup;  // the group's scales: [block][16 rows]
  for (int i = 0; i < 16; ++i) one(i, rows[i], s0 + i);
}

void amx_rows(const Weight& wt, const uint16_t* xp, int64_t T, int64_t K, float* y,
              int64_t ldy, bool accumulate, int64_t n0, int64_t n1) {
  const uint16_t* w = static_cast<const uint16_t*>(wt.data);
  const int64_t ldw = wt.ld;
  load_tile_config();
  const int64_t TB = (T + 15) / 16, KB = K / 32;
  alignas(64) float c[16 * 16];
  auto store = [&](int64_t n, int64_t tb) {
    // c[i][j] holds y[tb*16 + j][n + i]: transpose in registers, one row of y per token.
    __m512 col[16];
    transpose16x16(c, col);
    const int64_t valid = std::min<int64_t>(16, T - tb * 16);
    for (int64_t j = 0; j < valid; ++j) {
      float* o = y + (tb * 16 + j) * ldy + n;
      _mm512_storeu_ps(o, accumulate ? _mm512_add_ps(_mm512_loadu_ps(o), col[j]) : col[j]);
    }
  };
  // Loop order: one 32-row weight block at a time, its K in chunks of kKC k blocks (the A
  // tiles of a chunk, 32 rows x 256 k = 16 KiB, stay in L1 while every token pair passes
  // over them); the C tiles of all token pairs wait in cbuf between chunks (4 KiB each).
  constexpr int64_t kKC = 8;
  const int64_t TP = (TB + 1) / 2;
  thread_local std::vector<float> cbuf;
  cbuf.resize(static_cast<size_t>(TP * 4 * 256));
  // The A tiles of a chunk are copied into a contiguous buffer first: read in place, their
  // 16 rows sit K*2 bytes apart (4 KiB or a multiple for Gemma), all in one L1 set, and
  // evict each other before the next token pair can reuse them.
  alignas(64) uint16_t apack[kKC * 2 * 512];
  for (int64_t n = n0; n < n1; n += 32) {
    for (int64_t kc0 = 0; kc0 < KB; kc0 += kKC) {
      const int64_t kc1 = std::min(KB, kc0 + kKC);
      // With a single token pair the bf16 tiles are used once: load them in place.
      // Quantized weights are always unpacked here (dequantized to bf16).
      const bool packed = TP > 1 || wt.dtype != DType::BF16;
      if (packed)
        for (int64_t kb = kc0; kb < kc1; ++kb)
          for (int h = 0; h < 2; ++h) rows16_bf16(wt, n + 16 * h, kb, apack + ((kb - kc0) * 2 + h) * 512);
      for (int64_t tp = 0; tp < TP; ++tp) {
        const int64_t tb = 2 * tp;
        const bool two = tb + 1 < TB;
        float* cb = cbuf.data() + tp * 4 * 256;
        if (kc0 == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, cb, 64);
          _tile_loadd(1, cb + 256, 64);
          _tile_loadd(2, cb + 512, 64);
          _tile_loadd(3, cb + 768, 64);
        }
        for (int64_t kb = kc0; kb < kc1; ++kb) {
          if (packed) {
            _tile_loadd(4, apack + (kb - kc0) * 1024, 64);
            _tile_loadd(5, apack + (kb - kc0) * 1024 + 512, 64);
          } else {
            _tile_loadd(4, w + n * ldw + kb * 32, ldw * 2);
            _tile_loadd(5, w + (n + 16) * ldw + kb * 32, ldw * 2);
          }
          _tile_loadd(6, xp + (tb * KB + kb) * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 5, 6);
          if (two) {
            _tile_loadd(7, xp + ((tb + 1) * KB + kb) * 512, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        if (kc1 < KB) {
          _tile_stored(0, cb, 64);
          _tile_stored(1, cb + 256, 64);
          _tile_stored(2, cb + 512, 64);
          _tile_stored(3, cb + 768, 64);
          continue;
        }
        _tile_stored(0, c, 64);
        store(n, tb);
        _tile_stored(1, c, 64);
        store(n + 16, tb);
        if (two) {
          _tile_stored(2, c, 64);
          store(n, tb + 1);
          _tile_stored(3, c, 64);
          store(n + 16, tb + 1);
        }
      }
    }
  }
  _tile_release();
}
#endif

}  // namespace

namespace {
enum Path { kGeneric = 0, kDpBf16 = 1, kAmx = 2 };
int g_forced = -1;  // tests pin a path with set_bf16_matmul_path

int best_path() {
#ifdef GEMMA_HAVE_AMX
  if (amx_usable()) return kAmx;
#endif
  return kHaveDpBf16 ? kDpBf16 : kGeneric;
}
const char* kPathNames[] = {"generic", "avx512_bf16", "amx"};

void generic_rows(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                  bool accumulate) {
  // No bf16 dot-product instructions: widen the bf16-rounded inputs, float32 kernel.
  std::vector<float> xr(static_cast<size_t>(T * w.cols));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < w.cols; ++k) xr[t * w.cols + k] = bf16_to_f32(f32_to_bf16(x[t * ldx + k]));
  matmul_generic_bf16(xr.data(), T, w.cols, w, y, ldy, accumulate);
}
}  // namespace

const char* bf16_matmul_path() { return kPathNames[g_forced >= 0 ? g_forced : best_path()]; }

bool set_bf16_matmul_path(const std::string& name) {
  if (name.empty() || name == "auto") {
    g_forced = -1;
    return true;
  }
  for (int p = 0; p <= best_path(); ++p)
    if (name == kPathNames[p] && (p != kDpBf16 || kHaveDpBf16)) {
      g_forced = p;
      return true;
    }
  return false;
}

int64_t matmul_quant_amx(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                         bool accumulate) {
#ifdef GEMMA_HAVE_AMX
  if (w.cols % 32 != 0 || w.rows < 32 || !amx_usable() || (g_forced >= 0 && g_forced != kAmx)) return 0;
  const std::vector<uint16_t> xp = pack_vnni(x, T, ldx, w.cols);
  const int64_t n_done = w.rows - w.rows % 32;
  parallel_for(n_done / 32, [&](int64_t b0, int64_t b1) {
    amx_rows(w, xp.data(), T, w.cols, y, ldy, accumulate, b0 * 32, b1 * 32);
  });
  return n_done;
#else
  return 0;
#endif
}

void matmul_bf16(const float* x, int64_t T, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                 bool accumulate, Work work) {
  const int path = g_forced >= 0 ? g_forced : best_path();
  if (path == kGeneric) return generic_rows(x, T, ldx, w, y, ldy, accumulate);
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const uint16_t* wp = static_cast<const uint16_t*>(w.data);
  const int64_t N = w.rows, K = w.cols, Kp = (K + 31) / 32 * 32;
  int64_t n_done = 0;
#ifdef GEMMA_HAVE_AMX
  // AMX needs whole 32-wide k blocks (a tile row must not run past the weight row) and
  // whole 32-row n blocks; the remaining rows take the AVX512-BF16 path below.
  // Below kAmxMinTokens rows AMX would multiply mostly padding: a 16-token B tile for one
  // token. Decode is bound by reading W, which the VDPBF16PS path streams faster (measured:
  // 26 vs 15 GB/s at T = 1 on 2 cores). The two paths round alike (inputs to bf16, float32
  // sums) but add in a different order, so decode never takes AMX, at any batch size: a
  // row's bits must not depend on how many rows share its step (Work).
  constexpr int64_t kAmxMinTokens = 16;
  if (path == kAmx && work == Work::Prefill && K % 32 == 0 && N >= 32 && T >= kAmxMinTokens) {
    const std::vector<uint16_t> xp = pack_vnni(x, T, ldx, K);
    n_done = N - N % 32;
    parallel_for(n_done / 32, [&](int64_t b0, int64_t b1) {
      amx_rows(w, xp.data(), T, K, y, ldy, accumulate, b0 * 32, b1 * 32);
    });
    if (n_done == N) return;
  }
#endif
  const std::vector<uint16_t> xb = round_rows(x, T, ldx, K, Kp);
  const int64_t chunks = (N - n_done + 3) / 4;
  parallel_for(chunks, [&](int64_t c0, int64_t c1) {
    dp_rows(wp, w.ld, xb.data(), T, Kp, K, y, ldy, accumulate, n_done + c0 * 4,
            std::min(N, n_done + c1 * 4));
  });
#else
  generic_rows(x, T, ldx, w, y, ldy, accumulate);  // no bf16 instructions in this build
#endif
}

}  // namespace gemma
