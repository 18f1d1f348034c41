// CUDA kernels of the multi-tensor ops (schemas in ops/schemas.cpp, shared math in multi_math.h).
//
// Nothing is copied from the host: the per-layer descriptors (layer_desc.h) travel as a kernel
// argument, up to kLayersPerLaunch layers a launch (LaunchLayers, cuda_launch.cuh), so the ops can be
// captured in a CUDA graph.  Every block owns one chunk and finds its layer among the launch's
// layers, so all its threads see one layer: one group order, one geometry, no divergence between
// layers.
//
// Forward: one launch over all chunks writes a (penalty, eq_energy) pair per chunk through the fixed
// block tree; one second-stage launch (a block per layer) adds each layer's chunk pairs in a fixed
// order.  Backward: one launch over the same chunks writes every layer's dW, reading the layer's
// grad_penalty / grad_eq from device arrays.  No atomics; results are bitwise reproducible, and the
// grouping into launches changes no chunk and no summation order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "block_reduce.cuh"
#include "cuda_launch.cuh"
#include "multi_math.h"
#include "op_checks.h"
#include "orbit_math.h"
#include "static_switch.h"

namespace projkernels {
namespace {

// Orbits per chunk: four per thread, enough work per block to hide the reduction, small enough that
// a model's small layers still spread over several blocks.
constexpr int64_t kChunkOrbits = 4 * kThreads;
// A thread walks at most kChunkOrbits / kThreads orbits of a chunk: no batch is larger.
constexpr int multi_batch(int batch) {
  return batch < kChunkOrbits / kThreads ? batch : static_cast<int>(kChunkOrbits / kThreads);
}

// LaunchLayers, kLayersPerLaunch and for_each_launch: cuda_launch.cuh (shared with the decay).

template <typename scalar_t, bool BATCHED>
__global__ void __launch_bounds__(kThreads)
multi_forward_kernel(const __grid_constant__ LaunchLayers p, double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double scratch[kWarps];
  const int64_t c = p.chunk_base + blockIdx.x;
  const LayerDesc d = p.layers[layer_of_chunk(p.layers, p.n_layers, c)];
  const ChunkRange r = chunk_range(d, c, kChunkOrbits);
  acc_t pen = 0, eq = 0;
  // G and the table's encoding are uniform across the block (a chunk never spans two layers), so the
  // switches never diverge.
  SIGNED_SWITCH(d.signed_offsets, OFF, [&] {
    GROUP_ORDER_SWITCH(d.G, K, [&] {
      chunk_energies<K, false, scalar_t, acc_t, acc_t, acc_t, BATCHED ? multi_batch(forward_batch(K)) : 1>(
          d, reinterpret_cast<const OFF*>(d.offsets), r.first + threadIdx.x, r.last, blockDim.x, pen, eq);
    });
  });
  double v = block_sum(static_cast<double>(pen), scratch);
  if (threadIdx.x == 0) partials[2 * c] = v;
  v = block_sum(static_cast<double>(eq), scratch);
  if (threadIdx.x == 0) partials[2 * c + 1] = v;
}

// Block j adds the chunk pairs of the launch's layer j (a fixed assignment of chunks to threads,
// then the fixed tree).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
multi_finalize_kernel(const __grid_constant__ LaunchLayers p, const double* __restrict__ partials,
                      acc_t* __restrict__ pen_out, acc_t* __restrict__ eq_out) {
  __shared__ double scratch[kWarps];
  const int64_t begin = p.layers[blockIdx.x].chunk_begin, end = p.layers[blockIdx.x].chunk_end;
  double pp = 0, e = 0;
#pragma unroll 4
  for (int64_t c = begin + threadIdx.x; c < end; c += blockDim.x) {
    pp += partials[2 * c];
    e += partials[2 * c + 1];
  }
  const int64_t l = p.first_layer + static_cast<int64_t>(blockIdx.x);
  pp = block_sum(pp, scratch);
  if (threadIdx.x == 0) pen_out[l] = static_cast<acc_t>(pp);
  e = block_sum(e, scratch);
  if (threadIdx.x == 0) eq_out[l] = static_cast<acc_t>(e);
}

// The descriptor read from the kernel argument takes registers that the chunk-list version did not
// need; the bound keeps the occupancy that version had (4 blocks an SM, 3 for float64) without
// spilling.
template <typename scalar_t, bool BATCHED>
__global__ void __launch_bounds__(kThreads, sizeof(scalar_t) == 8 ? 3 : 4)
multi_backward_kernel(const __grid_constant__ LaunchLayers p, const at::opmath_type<scalar_t>* __restrict__ grad_pen,
                      int64_t pen_stride, const at::opmath_type<scalar_t>* __restrict__ grad_eq, int64_t eq_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = p.chunk_base + blockIdx.x;
  const int j = layer_of_chunk(p.layers, p.n_layers, c);
  const LayerDesc d = p.layers[j];
  const ChunkRange r = chunk_range(d, c, kChunkOrbits);
  const int64_t l = p.first_layer + j;
  const acc_t two_pen = acc_t(2) * grad_pen[l * pen_stride], two_eq = acc_t(2) * grad_eq[l * eq_stride];
  SIGNED_SWITCH(d.signed_offsets, OFF, [&] {
    GROUP_ORDER_SWITCH(d.G, K, [&] {
      chunk_gradient<K, scalar_t, acc_t, BATCHED ? multi_batch(backward_batch(K)) : 1>(
          d, reinterpret_cast<const OFF*>(d.offsets), r.first + threadIdx.x, r.last, blockDim.x, two_pen, two_eq);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> multi_forward_cuda(at::TensorList weights, at::TensorList offsets,
                                                      at::TensorList inv_stab, at::IntArrayRef geometry) {
  constexpr const char* op = "projkernels_C::multi_forward";
  LayerArgs a = check_multi_forward(weights, offsets, inv_stab, geometry);
  const CudaCall call(a.device);
  const int64_t L = static_cast<int64_t>(a.layers.size());
  const int64_t total_chunks = assign_chunks(a.layers.data(), L, kChunkOrbits);
  const auto opts = weights[0].options();
  const auto acc = acc_type_of(a.dtype);
  at::Tensor pen = at::empty({L}, opts.dtype(acc)), eq = at::empty({L}, opts.dtype(acc));
  at::Tensor partials = at::empty({2 * total_chunks}, opts.dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multi_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_launch(a.layers, kChunkOrbits, op, [&](const LaunchLayers& p, unsigned n_chunks) {
      auto kernel = orbit_batching() ? multi_forward_kernel<scalar_t, true> : multi_forward_kernel<scalar_t, false>;
      kernel<<<n_chunks, kThreads, 0, call.stream>>>(p, partials.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      multi_finalize_kernel<acc_t><<<static_cast<unsigned>(p.n_layers), kThreads, 0, call.stream>>>(
          p, partials.const_data_ptr<double>(), pen.mutable_data_ptr<acc_t>(), eq.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {pen, eq};
}

std::vector<at::Tensor> multi_backward_cuda(at::TensorList weights, const at::Tensor& grad_penalty,
                                            const at::Tensor& grad_eq, at::TensorList offsets, at::TensorList inv_stab,
                                            at::IntArrayRef geometry) {
  constexpr const char* op = "projkernels_C::multi_backward";
  LayerArgs a = check_multi_backward(weights, grad_penalty, grad_eq, offsets, inv_stab, geometry);
  const CudaCall call(a.device);
  assign_chunks(a.layers.data(), static_cast<int64_t>(a.layers.size()), kChunkOrbits);
  std::vector<at::Tensor> out = multi_grad_outputs(a);
  const auto acc = acc_type_of(a.dtype);
  // Already the accumulation dtype in the usual call, so no conversion kernels run; read with their
  // strides, so a total's gradient expanded over the layers (stride 0) is not copied either.
  const at::Tensor gp = grad_penalty.to(acc), ge = grad_eq.to(acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multi_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_launch(a.layers, kChunkOrbits, op, [&](const LaunchLayers& p, unsigned n_chunks) {
      auto kernel = orbit_batching() ? multi_backward_kernel<scalar_t, true> : multi_backward_kernel<scalar_t, false>;
      kernel<<<n_chunks, kThreads, 0, call.stream>>>(p, gp.const_data_ptr<acc_t>(), gp.stride(0),
                                                    ge.const_data_ptr<acc_t>(), ge.stride(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m) {
  m.impl("multi_forward", &projkernels::multi_forward_cuda);
  m.impl("multi_backward", &projkernels::multi_backward_cuda);
}
