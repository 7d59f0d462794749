// Internal to the attention files: loads from a float32 or bf16 KV cache, the score rule.
#pragma once
#include "cuda/common.cuh"

namespace gemma::cuda {

__device__ __forceinline__ float load_elem(const float* p) { return *p; }
__device__ __forceinline__ float load_elem(const uint16_t* p) { return bf16_bits_to_f32(*p); }

// Four consecutive elements (16-byte aligned for float32, 8-byte for bf16).
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const uint16_t* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  return make_float4(bf16_lo(u.x), bf16_hi(u.x), bf16_lo(u.y), bf16_hi(u.y));
}

// A raw score q.k -> scaled, then soft-capped (Gemma 2), as Model::attention does.
__device__ __forceinline__ float score_transform(float s, float scale, float cap) {
  float x = s * scale;
  if (cap > 0.f) x = tanhf(x / cap) * cap;
  return x;
}

constexpr float kNegInf = -__builtin_huge_valf();

}  // namespace gemma::cuda
