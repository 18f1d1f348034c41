// What every CUDA op of projkernels_C does before it launches: select the tensors' device, take
// the current stream, and know how much shared memory a block may use.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "layer_desc.h"
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

// --- the layers of one launch, as a kernel argument -----------------------------------------------
//
// Nothing is copied from the host: the ops over many layers (the multi-tensor penalty, the decay)
// pass the layers' descriptors as a kernel argument, a fixed-size struct of up to kLayersPerLaunch
// descriptors passed by value; a call on more layers makes one launch per group of kLayersPerLaunch
// layers.  Kernel arguments are recorded by value when a CUDA graph captures the launch, so the ops
// can be captured, and a call costs no host-to-device copy.  Every block owns one chunk and finds
// its layer among the launch's layers (layer_of_chunk), so all its threads see one layer.

// Layers per launch.  4 KiB of kernel arguments is what every driver accepts (the 32 KiB that CUDA
// 12.1+ allows on Volta and later also needs a driver of that release), so one launch carries 32
// descriptors (3.5 KiB) and the rest of its arguments.
constexpr int kLayersPerLaunch = 32;

// One launch's layers: descriptors of layers [first_layer, first_layer + n_layers) of the call,
// whose chunks are [chunk_base, chunk_base + grid size) of the call's chunk list.
struct LaunchLayers {
  LayerDesc layers[kLayersPerLaunch];
  int64_t chunk_base;
  int32_t first_layer;
  int32_t n_layers;
};
static_assert(sizeof(LaunchLayers) + 64 <= 4096, "kernel arguments must fit in 4 KiB");

// Calls launch(p, n_chunks) once per group of up to kLayersPerLaunch layers, with the group's
// descriptors and chunk count (assign_chunks has set the chunk ranges).  Host work only.
template <typename Launch>
void for_each_launch(const std::vector<LayerDesc>& layers, int64_t chunk_orbits, const char* op, Launch&& launch) {
  const int64_t L = static_cast<int64_t>(layers.size());
  for (int64_t l0 = 0; l0 < L; l0 += kLayersPerLaunch) {
    const int64_t n = std::min<int64_t>(kLayersPerLaunch, L - l0);
    LaunchLayers p{};
    std::copy_n(layers.data() + l0, n, p.layers);
    p.chunk_base = layers[l0].chunk_begin;
    p.first_layer = static_cast<int32_t>(l0);
    p.n_layers = static_cast<int32_t>(n);
    const int64_t n_chunks = layers[l0 + n - 1].chunk_end - p.chunk_base;
    TORCH_CHECK(n_chunks <= std::numeric_limits<int32_t>::max(), op, ": too many orbits for one launch (", n_chunks,
                " chunks of ", chunk_orbits, ")");
    if (n_chunks > 0) launch(p, static_cast<unsigned>(n_chunks));
  }
}

// The forward's and the backward's batch for group-order class K (1: one orbit at a time).
constexpr int forward_batch(int K) { return batch_orbits(K, 16); }
constexpr int backward_batch(int K) { return batch_orbits(K, 8); }

}  // namespace projkernels
