// CUDA kernels of the equivariance-decay ops (schemas and CPU kernels in decay_ops.cpp, per-orbit
// math in decay_math.h).
//
// One launch updates every layer, whatever the number of layers and their dtypes: the host writes
// the layer descriptors and the chunk list into one pinned buffer, copies it to the device
// asynchronously (no sync), and each block takes one chunk, so all of a block's threads see one
// layer: one dtype, one group order, one geometry.  Nothing is summed across orbits, so the update
// is deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "decay_checks.h"
#include "decay_math.h"
#include "orbit_math.h"
#include "static_switch.h"

namespace projkernels {
namespace decay {
namespace {

constexpr int kBlockThreads = 256;
// Orbits per block: four per thread.
constexpr int64_t kGpuChunk = 4 * kBlockThreads;

template <bool IN_PLACE, typename scalar_t>
__device__ __forceinline__ void decay_block(const Layer& d, const Chunk& c) {
  using acc_t = at::opmath_type<scalar_t>;
  // The block's group order is uniform across the block, so the switch never diverges.
  GROUP_ORDER_SWITCH(d.G, K, [&] { decay_chunk<K, IN_PLACE, scalar_t, acc_t>(d, c.first + threadIdx.x, c.last, blockDim.x); });
}

template <bool IN_PLACE>
__global__ void __launch_bounds__(kBlockThreads)
multi_decay_kernel(const Layer* __restrict__ layers, const Chunk* __restrict__ chunks) {
  const Chunk c = chunks[blockIdx.x];
  const Layer d = layers[c.layer];
  switch (d.dtype) {
    case kF32: decay_block<IN_PLACE, float>(d, c); break;
    case kF64: decay_block<IN_PLACE, double>(d, c); break;
    case kF16: decay_block<IN_PLACE, c10::Half>(d, c); break;
    default: decay_block<IN_PLACE, c10::BFloat16>(d, c); break;
  }
}

template <bool IN_PLACE>
void run_cuda(DecayArgs& a, const char* op) {
  const c10::cuda::CUDAGuard guard(a.device);
  const auto stream = c10::cuda::getCurrentCUDAStream(a.device.index());
  const int64_t L = static_cast<int64_t>(a.layers.size());
  const int64_t n_chunks = assign_chunks(a.layers.data(), L, kGpuChunk);
  TORCH_CHECK(n_chunks <= std::numeric_limits<int32_t>::max(), op, ": too many orbits for one launch (", n_chunks,
              " chunks of ", kGpuChunk, ")");
  if (n_chunks == 0) return;
  static_assert(sizeof(Layer) % alignof(Chunk) == 0, "chunks follow the descriptors unpadded");
  const int64_t layer_bytes = L * static_cast<int64_t>(sizeof(Layer));
  const int64_t total = layer_bytes + n_chunks * static_cast<int64_t>(sizeof(Chunk));
  at::Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  unsigned char* hp = host.mutable_data_ptr<unsigned char>();
  std::memcpy(hp, a.layers.data(), layer_bytes);
  list_chunks(a.layers.data(), L, kGpuChunk, reinterpret_cast<Chunk*>(hp + layer_bytes));
  // The caching host allocator keeps the pinned block alive until the copy on `stream` has run.
  const at::Tensor dev = host.to(a.device, /*non_blocking=*/true);
  const unsigned char* dp = dev.const_data_ptr<unsigned char>();
  multi_decay_kernel<IN_PLACE><<<static_cast<unsigned>(n_chunks), kBlockThreads, 0, stream>>>(
      reinterpret_cast<const Layer*>(dp), reinterpret_cast<const Chunk*>(dp + layer_bytes));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void multi_decay_cuda(at::TensorList weights, at::TensorList offsets, at::IntArrayRef geometry,
                      at::ArrayRef<double> coef_dev, at::ArrayRef<double> coef_mean) {
  constexpr const char* op = "projkernels_C::multi_decay_";
  DecayArgs a = check_decay(weights, nullptr, offsets, geometry, coef_dev, coef_mean, op);
  run_cuda<true>(a, op);
}

void multi_decay_grad_cuda(at::TensorList grads, at::TensorList weights, at::TensorList offsets,
                           at::IntArrayRef geometry, at::ArrayRef<double> coef_dev, at::ArrayRef<double> coef_mean) {
  constexpr const char* op = "projkernels_C::multi_decay_grad_";
  DecayArgs a = check_decay(grads, &weights, offsets, geometry, coef_dev, coef_mean, op);
  run_cuda<false>(a, op);
}

}  // namespace
}  // namespace decay
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m) {
  m.impl("multi_decay_", &projkernels::decay::multi_decay_cuda);
  m.impl("multi_decay_grad_", &projkernels::decay::multi_decay_grad_cuda);
}
