// One small vector abstraction over the instruction sets the CPU kernels use, chosen at
// compile time by the build's -march (GEMMA_CPP_NATIVE=ON builds for the building CPU).
//   VecF::N          lanes of float32
//   VecF::load(p)    N floats;  VecF::load_bf16(p): N bfloat16 (uint16) widened to float32
//   fma(a, b, c)     a*b + c;   hsum(v): sum of the lanes
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
inline float hsum(VecF a) { return a.v; }
}  // namespace gemma::simd
#endif

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
