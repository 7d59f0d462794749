// GeGLU: out = gelu_tanh(gate) * up, element-wise, float32, grid-stride; and the residual add.
#include "cuda/common.cuh"

namespace gemma::cuda {
namespace {

// gelu_tanh(a) = 0.5 a (1 + tanh(u)) = a / (1 + exp(-2u)), u = sqrt(2/pi) (a + 0.044715 a^3):
// the CPU's formula with its float32 constants (csrc/cpu/ops.cpp); expf for its exp.
__device__ __forceinline__ float gelu_tanh(float a) {
  constexpr float c1 = -2.0f * 0.7978845608028654f;
  constexpr float c3 = -2.0f * 0.7978845608028654f * 0.044715f;
  const float z = a * fmaf(c3, a * a, c1);  // -2u
  return a / (1.0f + expf(z));
}

__global__ void geglu_kernel(const float* gate, const float* __restrict__ up, float* out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    out[i] = gelu_tanh(gate[i]) * up[i];
}

__global__ void add_kernel(float* x, const float* __restrict__ y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) x[i] += y[i];
}

unsigned grid(int64_t n) {
  const int64_t blocks = ceil_div(n, 256);
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}

}  // namespace

cudaError_t add(float* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  add_kernel<<<grid(n), 256, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t geglu(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  geglu_kernel<<<grid(n), 256, 0, stream>>>(gate, up, out, n);
  return cudaGetLastError();
}

}  // namespace gemma::cuda
