// One small vector abstraction over the instruction sets the CPU kernels use, chosen at
// compile time by the build's -march (GEMMA_CPP_NATIVE=ON builds for the building CPU).
//   VecF::N          lanes of float32
//   VecF::load(p)    N floats;  VecF::load_bf16(p): N bfloat16 (uint16) widened to float32
//   fma(a, b, c)     a*b + c (one rounding);   hsum(v): sum of the lanes
//   min, max         x86's rule: the second operand when either is NaN
//   round(v)         to the nearest integer, ties to even
//   scale_pow2(p, n) p * 2^n for integral n in [-126, 128], rounded once
//   exp(v)           below: one definition over VecF for every instruction set
// The scalar variant (N = 1) is the portable path and the reference the others are tested
// against through the same templates.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GEMMA_ISA_NAME "avx512"
namespace gemma::simd {
struct VecF {
  static constexpr int N = 16;
  __m512 v;
  static VecF zero() { return {_mm512_setzero_ps()}; }
  static VecF set1(float x) { return {_mm512_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecF load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  static VecF load(const uint16_t* p) { return load_bf16(p); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
};
inline VecF fma(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF add(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VecF mul(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VecF div(VecF a, VecF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VecF min(VecF a, VecF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VecF max(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VecF round(VecF a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline VecF scale_pow2(VecF p, VecF n) { return {_mm512_scalef_ps(p.v, n.v)}; }
inline float hsum(VecF a) { return _mm512_reduce_add_ps(a.v); }
}  // namespace gemma::simd
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMMA_ISA_NAME "avx2"
namespace gemma::simd {
struct VecF {
  static constexpr int N = 8;
  __m256 v;
  static VecF zero() { return {_mm256_setzero_ps()}; }
  static VecF set1(float x) { return {_mm256_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecF load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static VecF load(const uint16_t* p) { return load_bf16(p); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};
inline VecF fma(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF add(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VecF mul(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VecF div(VecF a, VecF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VecF min(VecF a, VecF b) { return {_mm256_min_ps(a.v, b.v)}; }
inline VecF max(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VecF round(VecF a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// 2^n in two factors (each a normal float for n in [-126, 128]): p * 2^(n/2) is exact, so
// the one rounding is the last product's, as with scalef.
inline VecF scale_pow2(VecF p, VecF n) {
  const __m256i ni = _mm256_cvtps_epi32(n.v), half = _mm256_srai_epi32(ni, 1), bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  return {_mm256_mul_ps(_mm256_mul_ps(p.v, s1), s2)};
}
inline float hsum(VecF a) {
  __m128 lo = _mm256_castps256_ps128(a.v), hi = _mm256_extractf128_ps(a.v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
}  // namespace gemma::simd
#else
#define GEMMA_ISA_NAME "scalar"
namespace gemma::simd {
struct VecF {
  static constexpr int N = 1;
  float v;
  static VecF zero() { return {0.f}; }
  static VecF set1(float x) { return {x}; }
  static VecF load(const float* p) { return {*p}; }
  static VecF load_bf16(const uint16_t* p) {
    uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return {f};
  }
  static VecF load(const uint16_t* p) { return load_bf16(p); }
  void store(float* p) const { *p = v; }
};
inline VecF fma(VecF a, VecF b, VecF c) { return {std::fma(a.v, b.v, c.v)}; }
inline VecF add(VecF a, VecF b) { return {a.v + b.v}; }
inline VecF mul(VecF a, VecF b) { return {a.v * b.v}; }
inline VecF div(VecF a, VecF b) { return {a.v / b.v}; }
inline VecF min(VecF a, VecF b) { return {a.v < b.v ? a.v : b.v}; }
inline VecF max(VecF a, VecF b) { return {a.v > b.v ? a.v : b.v}; }
inline VecF round(VecF a) { return {std::nearbyint(a.v)}; }
inline VecF scale_pow2(VecF p, VecF n) { return {std::ldexp(p.v, static_cast<int>(n.v))}; }
inline float hsum(VecF a) { return a.v; }
}  // namespace gemma::simd
#endif

namespace gemma::simd {
// e^x on VecF::N lanes. Range reduction x = n ln2 + r, |r| <= ln2/2 (ln2 in two parts, so r
// is exact), then a degree-6 polynomial for e^r (Cephes expf coefficients), then p * 2^n.
// Inputs are clamped to [-87.34, 88.72]: below, about 2^-126 (not 0: callers that need 0
// mask it); above, about 2^128 (finite); NaN gives 2^-126. Relative error 1.2e-7. The same
// operations on every instruction set: the scalar and AVX2 builds give identical bits.
inline VecF exp(VecF x) {
  x = min(max(x, VecF::set1(-87.33654f)), VecF::set1(88.72283f));
  const VecF n = round(mul(x, VecF::set1(1.44269504088896341f)));
  VecF r = fma(n, VecF::set1(-0.693359375f), x);
  r = fma(n, VecF::set1(2.12194440e-4f), r);
  VecF p = VecF::set1(1.9875691500E-4f);
  p = fma(p, r, VecF::set1(1.3981999507E-3f));
  p = fma(p, r, VecF::set1(8.3334519073E-3f));
  p = fma(p, r, VecF::set1(4.1665795894E-2f));
  p = fma(p, r, VecF::set1(1.6666665459E-1f));
  p = fma(p, r, VecF::set1(5.0000001201E-1f));
  p = fma(p, mul(r, r), add(r, VecF::set1(1.f)));
  return scale_pow2(p, n);
}
}  // namespace gemma::simd

namespace gemma {
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as torch's .to(bfloat16) does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const uint16_t* p) { return bf16_to_f32(*p); }
}  // namespace gemma
