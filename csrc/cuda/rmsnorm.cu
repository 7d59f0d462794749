// RMSNorm, alone and fused with the residual add: one block per row, float32 throughout.
// Each thread owns the elements i = threadIdx.x + k * blockDim.x of its row in every pass,
// so a value a thread writes it also reads back itself (no barrier between those passes).
#include "cuda/common.cuh"

namespace gemma::cuda {
namespace {

constexpr int kThreads = 256;

// 1 / sqrt(mean + eps) rounded as the CPU's 1.0f / std::sqrt(ms + eps) (IEEE sqrt and
// division: this file is built without fast-math).
__device__ __forceinline__ float inv_rms(float sumsq, int64_t H, float eps) {
  const float ms = sumsq / static_cast<float>(H);
  return 1.0f / sqrtf(ms + eps);
}

__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(const float* x, const float* __restrict__ w, float* out,
                                                           int64_t H, float eps) {
  __shared__ float scratch[32];
  const float* xr = x + blockIdx.x * H;
  float* o = out + blockIdx.x * H;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += kThreads) ss += xr[i] * xr[i];
  const float inv = inv_rms(block_sum(ss, scratch), H, eps);
  for (int64_t i = threadIdx.x; i < H; i += kThreads) o[i] = (xr[i] * inv) * w[i];
}

__global__ void __launch_bounds__(kThreads) add_rmsnorm_kernel(const float* __restrict__ y, const float* __restrict__ w_post,
                                                               float* x, const float* __restrict__ w_next,
                                                               float* __restrict__ out, int64_t H, float eps) {
  __shared__ float scratch[32];
  const float* yr = y + blockIdx.x * H;
  float* xr = x + blockIdx.x * H;
  float* o = out + blockIdx.x * H;
  float inv_y = 1.f;
  if (w_post) {
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < H; i += kThreads) ss += yr[i] * yr[i];
    inv_y = inv_rms(block_sum(ss, scratch), H, eps);
  }
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += kThreads) {
    const float add = w_post ? (yr[i] * inv_y) * w_post[i] : yr[i];
    const float v = xr[i] + add;
    xr[i] = v;
    ss += v * v;
  }
  const float inv = inv_rms(block_sum(ss, scratch), H, eps);
  for (int64_t i = threadIdx.x; i < H; i += kThreads) o[i] = (xr[i] * inv) * w_next[i];
}

}  // namespace

cudaError_t rmsnorm(const float* x, const float* w, float* out, int64_t T, int64_t H, float eps, cudaStream_t stream) {
  if (T <= 0 || H <= 0) return cudaSuccess;
  rmsnorm_kernel<<<static_cast<unsigned>(T), kThreads, 0, stream>>>(x, w, out, H, eps);
  return cudaGetLastError();
}

cudaError_t add_rmsnorm(const float* y, const float* w_post, float* x, const float* w_next, float* out, int64_t T,
                        int64_t H, float eps, cudaStream_t stream) {
  if (T <= 0 || H <= 0) return cudaSuccess;
  add_rmsnorm_kernel<<<static_cast<unsigned>(T), kThreads, 0, stream>>>(y, w_post, x, w_next, out, H, eps);
  return cudaGetLastError();
}

}  // namespace gemma::cuda
