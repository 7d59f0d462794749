// The CUDA device (engine/device.h) over the kernels of cuda/cuda_ops.h (built with them:
// only a build with CUDA has it).
#pragma once
#include <memory>

#include "engine/device.h"

namespace gemma::cuda {

// Device `index` (cuda:index). Throws std::runtime_error with cuda_status()'s reason where CUDA
// cannot run, std::invalid_argument for an index past the device count.
std::shared_ptr<Device> make_cuda_device(int index);

}  // namespace gemma::cuda
