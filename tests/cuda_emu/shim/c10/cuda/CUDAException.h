// Error checks of the emulated device: a runtime call that fails throws; launches throw themselves.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                              \
  do {                                                                    \
    const cudaError_t projkernels_emu_err = (expr);                       \
    TORCH_CHECK(projkernels_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(projkernels_emu_err)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
