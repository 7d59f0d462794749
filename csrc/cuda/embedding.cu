// Embedding gather + scale: one block per token, the row dequantized as weight_row() does.
#include "cuda/common.cuh"

namespace gemma::cuda {
namespace {

__global__ void embed_kernel(Weight table, const int32_t* __restrict__ ids, float scale, float* __restrict__ out) {
  const int64_t t = blockIdx.x, H = table.cols;
  float* o = out + t * H;
  const int64_t id = ids[t];
  if (id < 0 || id >= table.rows) {
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) o[i] = __int_as_float(0x7fc00000);
    return;
  }
  switch (table.dtype) {
    case DType::F32: {
      const float* r = static_cast<const float*>(table.data) + id * table.ld;
      for (int64_t i = threadIdx.x; i < H; i += blockDim.x) o[i] = r[i] * scale;
      break;
    }
    case DType::BF16: {
      const uint16_t* r = static_cast<const uint16_t*>(table.data) + id * table.ld;
      for (int64_t i = threadIdx.x; i < H; i += blockDim.x) o[i] = bf16_bits_to_f32(r[i]) * scale;
      break;
    }
    case DType::Int8: {  // w = d * q
      const int8_t* q = static_cast<const int8_t*>(table.data) + id * table.ld;
      const uint16_t* d = table.scales + id * (H / 32);
      for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
        o[i] = static_cast<float>(q[i]) * f16_bits_to_f32(d[i / 32]) * scale;
      break;
    }
    case DType::Int4: {  // w = d * (q - 8); element i of pair p = i / 64: byte i % 32, nibble (i / 32) % 2
      const uint8_t* q = static_cast<const uint8_t*>(table.data) + id * table.ld;
      const uint16_t* d = table.scales + id * (H / 32);
      for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
        const int v = ((q[(i / 64) * 32 + i % 32] >> (((i / 32) % 2) * 4)) & 0xF) - 8;
        o[i] = static_cast<float>(v) * f16_bits_to_f32(d[i / 32]) * scale;
      }
      break;
    }
    default:  // refused by embed() before the launch
      break;
  }
}

}  // namespace

cudaError_t embed(const Weight& table, const int32_t* ids, int64_t T, float scale, float* out, cudaStream_t stream) {
  switch (table.dtype) {  // the kernel's cases; any other format is refused on the host
    case DType::F32: case DType::BF16: case DType::Int8: case DType::Int4: break;
    default: return cudaErrorNotSupported;
  }
  if (T <= 0) return cudaSuccess;
  embed_kernel<<<static_cast<unsigned>(T), 256, 0, stream>>>(table, ids, scale, out);
  return cudaGetLastError();
}

}  // namespace gemma::cuda
