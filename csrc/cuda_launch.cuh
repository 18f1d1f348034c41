// What every CUDA op of projkernels_C does before it launches: select the tensors' device, take
// the current stream, and know how much shared memory a block may use.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace projkernels {

// Room left for the kernels' static shared memory (the block-reduction scratch, 64 bytes).
constexpr int64_t kStaticSharedReserve = 1024;

struct CudaCall {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  int64_t shared_budget;  // dynamic shared memory a block may use without opting in above 48 KiB

  explicit CudaCall(c10::Device device)
      : guard(device),
        stream(c10::cuda::getCurrentCUDAStream(device.index()).stream()),
        shared_budget(shared_limit(device.index()) - kStaticSharedReserve) {}

  // The device's per-block shared memory without opt-in, queried once per device (calls on small
  // weights are host-bound, so the op path avoids repeated driver queries).
  static int64_t shared_limit(c10::DeviceIndex index) {
    static std::atomic<int64_t> cache[64];  // zero-initialised: not yet queried
    std::atomic<int64_t>* slot = index >= 0 && index < 64 ? &cache[index] : nullptr;
    if (slot != nullptr) {
      const int64_t known = slot->load(std::memory_order_relaxed);
      if (known > 0) return known;
    }
    int bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlock, index));
    if (slot != nullptr) slot->store(bytes, std::memory_order_relaxed);
    return bytes;
  }
};

}  // namespace projkernels
