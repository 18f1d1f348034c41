// CUDA kernels of the equivariance-decay ops (schemas in ops/schemas.cpp, CPU kernels in
// cpu/decay_kernels.cpp, per-orbit math in decay_math.h).
//
// One launch per group of up to kLayersPerLaunch layers, whatever their dtypes: the layer
// descriptors travel as a kernel argument (LaunchLayers, cuda_launch.cuh), as the multi-tensor
// penalty's do, so nothing is copied from the host and the update can be captured in a CUDA graph.
// Each block takes one chunk, so all of a block's threads see one layer: one dtype, one group
// order, one geometry.  Nothing is summed across orbits, so the update is deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "cuda_launch.cuh"
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
__device__ __forceinline__ void decay_block(const LayerDesc& d, const ChunkRange& r) {
  using acc_t = at::opmath_type<scalar_t>;
  // The block's group order is uniform across the block, so the switch never diverges.
  SIGNED_SWITCH(d.signed_offsets, OFF, [&] {
    GROUP_ORDER_SWITCH(d.G, K, [&] {
      decay_chunk<K, IN_PLACE, scalar_t, acc_t, OFF>(d, r.first + threadIdx.x, r.last, blockDim.x);
    });
  });
}

template <bool IN_PLACE>
__global__ void __launch_bounds__(kBlockThreads)
multi_decay_kernel(const __grid_constant__ LaunchLayers p) {
  const int64_t c = p.chunk_base + blockIdx.x;
  const LayerDesc d = p.layers[layer_of_chunk(p.layers, p.n_layers, c)];
  const ChunkRange r = chunk_range(d, c, kGpuChunk);
  switch (d.dtype) {
    case kF32: decay_block<IN_PLACE, float>(d, r); break;
    case kF64: decay_block<IN_PLACE, double>(d, r); break;
    case kF16: decay_block<IN_PLACE, c10::Half>(d, r); break;
    default: decay_block<IN_PLACE, c10::BFloat16>(d, r); break;
  }
}

template <bool IN_PLACE>
void run_cuda(LayerArgs& a, const char* op) {
  const CudaCall call(a.device);
  assign_chunks(a.layers.data(), static_cast<int64_t>(a.layers.size()), kGpuChunk);
  for_each_launch(a.layers, kGpuChunk, op, [&](const LaunchLayers& p, unsigned n_chunks) {
    multi_decay_kernel<IN_PLACE><<<n_chunks, kBlockThreads, 0, call.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void multi_decay_cuda(at::TensorList weights, at::TensorList offsets, at::IntArrayRef geometry,
                      at::ArrayRef<double> coef_dev, at::ArrayRef<double> coef_mean) {
  constexpr const char* op = "projkernels_C::multi_decay_";
  LayerArgs a = check_decay(weights, nullptr, offsets, geometry, coef_dev, coef_mean, op);
  run_cuda<true>(a, op);
}

void multi_decay_grad_cuda(at::TensorList grads, at::TensorList weights, at::TensorList offsets,
                           at::IntArrayRef geometry, at::ArrayRef<double> coef_dev, at::ArrayRef<double> coef_mean) {
  constexpr const char* op = "projkernels_C::multi_decay_grad_";
  LayerArgs a = check_decay(grads, &weights, offsets, geometry, coef_dev, coef_mean, op);
  run_cuda<false>(a, op);
}

}  // namespace
}  // namespace decay
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m) {
  m.impl("multi_decay_", &projkernels::decay::multi_decay_cuda);
  m.impl("multi_decay_grad_", &projkernels::decay::multi_decay_grad_cuda);
}
