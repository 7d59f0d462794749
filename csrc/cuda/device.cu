// The device probe: whether this process can run the kernels, and if not, why.
#include <cuda_runtime.h>

#include <string>

#include "cuda/cuda_ops.h"

#ifndef GEMMA_CPP_CUDA_ARCHS
#define GEMMA_CPP_CUDA_ARCHS "?"
#endif

namespace gemma::cuda {
namespace {

__global__ void probe_kernel(int* p) {
  if (p) *p = 1;
}

std::string version_str(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

std::string err_str(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + std::to_string(static_cast<int>(e)) + "): " +
         cudaGetErrorString(e);
}

DeviceStatus probe() {
  DeviceStatus s;
  cudaRuntimeGetVersion(&s.runtime_version);
  if (cudaDriverGetVersion(&s.driver_version) != cudaSuccess) s.driver_version = 0;
  const cudaError_t e = cudaGetDeviceCount(&s.device_count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    s.device_count = 0;
    if (e == cudaErrorInsufficientDriver && s.driver_version == 0)
      s.reason = "no CUDA driver (cudaErrorInsufficientDriver: libcuda was not found)";
    else if (e == cudaErrorInsufficientDriver)
      s.reason = "the CUDA driver (" + version_str(s.driver_version) + ") is older than this build's runtime (" +
                 version_str(s.runtime_version) + "): cudaErrorInsufficientDriver";
    else if (e == cudaErrorNoDevice)
      s.reason = "no CUDA device (cudaErrorNoDevice; check CUDA_VISIBLE_DEVICES)";
    else
      s.reason = "cudaGetDeviceCount failed: " + err_str(e);
    return s;
  }
  if (s.device_count == 0) {
    s.reason = "no CUDA device";
    return s;
  }
  cudaDeviceProp prop;
  if (cudaError_t pe = cudaGetDeviceProperties(&prop, 0); pe != cudaSuccess) {
    cudaGetLastError();
    s.reason = "cudaGetDeviceProperties failed: " + err_str(pe);
    return s;
  }
  s.name = prop.name;
  s.cc_major = prop.major;
  s.cc_minor = prop.minor;
  const std::string sm = "sm_" + std::to_string(prop.major) + std::to_string(prop.minor);
  if (prop.major < 8) {
    s.reason = s.name + " (" + sm + ") is older than the sm_80 (Ampere) these kernels need (bf16 tensor cores)";
    return s;
  }
  cudaFuncAttributes attr;
  if (cudaError_t fe = cudaFuncGetAttributes(&attr, probe_kernel); fe != cudaSuccess) {
    cudaGetLastError();
    s.reason = "no kernel image for " + s.name + " (" + sm + ") in this build (CUDA architectures " +
               GEMMA_CPP_CUDA_ARCHS + "): rebuild with CUDAARCHS=" + std::to_string(prop.major) +
               std::to_string(prop.minor) + " (" + err_str(fe) + ")";
    return s;
  }
  s.available = true;
  s.reason = s.name + " (" + sm + ", " + std::to_string(prop.multiProcessorCount) + " SMs, " +
             std::to_string(prop.totalGlobalMem >> 20) + " MiB), CUDA runtime " + version_str(s.runtime_version) +
             ", driver " + version_str(s.driver_version);
  return s;
}

}  // namespace

const DeviceStatus& device_status() {
  static const DeviceStatus s = probe();
  return s;
}

int sm_count() {
  static int cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return 1;
  }
  if (cached[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = 1;
    }
    cached[dev] = n;
  }
  return cached[dev];
}

}  // namespace gemma::cuda
