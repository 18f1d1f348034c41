// The CUDA runtime calls of the host code, answered by the emulated device (cuda_emu.h).
#pragma once
#include "cuda_emu.h"

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlock = 8 };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlock) return 1;
  *value = static_cast<int>(cuda_emu::shared_limit());
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
