// What every CUDA op of projkernels_C does before it launches: select the tensors' device, take
// the current stream, and know how much shared memory a block may use.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "orbit_math.h"  // batch_orbits

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

namespace {
// PROJKERNELS_ORBIT_BATCH=1 in the environment (read once per process): the chunked kernels of the
// exact group orders issue the loads of a batch of orbits before using any (orbit_math.h,
// batch_orbits).  Off by default until it has been timed against the one-orbit walk on a GPU
// (bench/gpu_check.sh times both).  Internal linkage: each CUDA file reads the switch itself.
bool orbit_batching() {
  static const bool on = [] {
    const char* v = std::getenv("PROJKERNELS_ORBIT_BATCH");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}
}  // namespace

// The forward's and the backward's batch for group-order class K (1: one orbit at a time).
constexpr int forward_batch(int K) { return batch_orbits(K, 16); }
constexpr int backward_batch(int K) { return batch_orbits(K, 8); }

}  // namespace projkernels
