// What every CUDA op of projkernels_C does before it launches: select the tensors' device, take
// the current stream, and know how much shared memory a block may use.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace projkernels {

// Room left for the kernels' static shared memory (the block-reduction scratch, 64 bytes).
constexpr int64_t kStaticSharedReserve = 1024;

struct CudaCall {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  int64_t shared_budget;  // dynamic shared memory a block may use without opting in above 48 KiB

  explicit CudaCall(c10::Device device)
      : guard(device), stream(c10::cuda::getCurrentCUDAStream(device.index()).stream()), shared_budget(0) {
    int bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlock, device.index()));
    shared_budget = static_cast<int64_t>(bytes) - kStaticSharedReserve;
  }
};

}  // namespace projkernels
