// CUDA kernels of the multi-tensor ops (schemas in ops.cpp, shared math in multi_math.h).
//
// The host writes the per-layer descriptors and the chunk list into one pinned buffer and copies it
// to the device asynchronously (no sync).  Every block owns one chunk, so all its threads see one
// layer: one group order, one geometry, no divergence between layers.
//
// Forward: one launch over all chunks writes a (penalty, eq_energy) pair per chunk through the fixed
// block tree; one second-stage launch (a block per layer) adds each layer's chunk pairs in a fixed
// order.  Backward: one launch over the same chunks writes every layer's dW, reading the layer's
// grad_penalty / grad_eq from device arrays.  No atomics; results are bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstring>
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

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
multi_forward_kernel(const LayerDesc* __restrict__ layers, const Chunk* __restrict__ chunks,
                     double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double scratch[kWarps];
  const Chunk c = chunks[blockIdx.x];
  const LayerDesc d = layers[c.layer];
  acc_t pen = 0, eq = 0;
  // G is uniform across the block (a chunk never spans two layers), so the switch never diverges.
  GROUP_ORDER_SWITCH(d.G, K, [&] {
    chunk_energies<K, false, scalar_t, acc_t, acc_t>(d, d.offsets, c.first + threadIdx.x, c.last, blockDim.x, pen, eq);
  });
  double v = block_sum(static_cast<double>(pen), scratch);
  if (threadIdx.x == 0) partials[2 * static_cast<int64_t>(blockIdx.x)] = v;
  v = block_sum(static_cast<double>(eq), scratch);
  if (threadIdx.x == 0) partials[2 * static_cast<int64_t>(blockIdx.x) + 1] = v;
}

// Block l adds layer l's chunk pairs (a fixed assignment of chunks to threads, then the fixed tree).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
multi_finalize_kernel(const LayerDesc* __restrict__ layers, const double* __restrict__ partials,
                      acc_t* __restrict__ pen_out, acc_t* __restrict__ eq_out) {
  __shared__ double scratch[kWarps];
  const int64_t begin = layers[blockIdx.x].chunk_begin, end = layers[blockIdx.x].chunk_end;
  double p = 0, e = 0;
#pragma unroll 4
  for (int64_t c = begin + threadIdx.x; c < end; c += blockDim.x) {
    p += partials[2 * c];
    e += partials[2 * c + 1];
  }
  p = block_sum(p, scratch);
  if (threadIdx.x == 0) pen_out[blockIdx.x] = static_cast<acc_t>(p);
  e = block_sum(e, scratch);
  if (threadIdx.x == 0) eq_out[blockIdx.x] = static_cast<acc_t>(e);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
multi_backward_kernel(const LayerDesc* __restrict__ layers, const Chunk* __restrict__ chunks,
                      const at::opmath_type<scalar_t>* __restrict__ grad_pen,
                      const at::opmath_type<scalar_t>* __restrict__ grad_eq) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunk c = chunks[blockIdx.x];
  const LayerDesc d = layers[c.layer];
  const acc_t two_pen = acc_t(2) * grad_pen[c.layer], two_eq = acc_t(2) * grad_eq[c.layer];
  GROUP_ORDER_SWITCH(d.G, K, [&] {
    chunk_gradient<K, scalar_t, acc_t>(d, d.offsets, c.first + threadIdx.x, c.last, blockDim.x, two_pen, two_eq);
  });
}

// The descriptors and chunk list on the device, from one pinned staging buffer.  The caching host
// allocator keeps the staging block alive until the copy on `stream` has run.
struct DeviceTable {
  at::Tensor bytes;
  const LayerDesc* layers = nullptr;
  const Chunk* chunks = nullptr;
  int64_t n_chunks = 0;
};

DeviceTable upload(MultiArgs& a, const char* op) {
  const int64_t L = static_cast<int64_t>(a.layers.size());
  const int64_t n_chunks = assign_chunks(a.layers.data(), L, kChunkOrbits);
  TORCH_CHECK(n_chunks <= std::numeric_limits<int32_t>::max(), op, ": too many orbits for one launch (", n_chunks,
              " chunks of ", kChunkOrbits, ")");
  static_assert(sizeof(LayerDesc) % alignof(Chunk) == 0, "chunks follow the descriptors unpadded");
  const int64_t layer_bytes = L * static_cast<int64_t>(sizeof(LayerDesc));
  const int64_t total = layer_bytes + n_chunks * static_cast<int64_t>(sizeof(Chunk));
  at::Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  unsigned char* hp = host.mutable_data_ptr<unsigned char>();
  std::memcpy(hp, a.layers.data(), layer_bytes);
  list_chunks(a.layers.data(), L, kChunkOrbits, reinterpret_cast<Chunk*>(hp + layer_bytes));
  DeviceTable t;
  t.bytes = host.to(a.device, /*non_blocking=*/true);
  const unsigned char* dp = t.bytes.const_data_ptr<unsigned char>();
  t.layers = reinterpret_cast<const LayerDesc*>(dp);
  t.chunks = reinterpret_cast<const Chunk*>(dp + layer_bytes);
  t.n_chunks = n_chunks;
  return t;
}

std::tuple<at::Tensor, at::Tensor> multi_forward_cuda(at::TensorList weights, at::TensorList offsets,
                                                      at::TensorList inv_stab, at::IntArrayRef geometry) {
  constexpr const char* op = "projkernels_C::multi_forward";
  MultiArgs a = check_multi(weights, offsets, inv_stab, geometry, op);
  const CudaCall call(a.device);
  const DeviceTable t = upload(a, op);
  const int64_t L = static_cast<int64_t>(a.layers.size());
  const auto opts = weights[0].options();
  const auto acc = acc_type_of(a.dtype);
  at::Tensor pen = at::empty({L}, opts.dtype(acc)), eq = at::empty({L}, opts.dtype(acc));
  at::Tensor partials = at::empty({2 * t.n_chunks}, opts.dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multi_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_forward_kernel<scalar_t><<<static_cast<unsigned>(t.n_chunks), kThreads, 0, call.stream>>>(
        t.layers, t.chunks, partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    multi_finalize_kernel<acc_t><<<static_cast<unsigned>(L), kThreads, 0, call.stream>>>(
        t.layers, partials.const_data_ptr<double>(), pen.mutable_data_ptr<acc_t>(), eq.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pen, eq};
}

std::vector<at::Tensor> multi_backward_cuda(at::TensorList weights, const at::Tensor& grad_penalty,
                                            const at::Tensor& grad_eq, at::TensorList offsets, at::TensorList inv_stab,
                                            at::IntArrayRef geometry) {
  constexpr const char* op = "projkernels_C::multi_backward";
  MultiArgs a = check_multi(weights, offsets, inv_stab, geometry, op);
  check_multi_grad(a, grad_penalty, "grad_penalty", op);
  check_multi_grad(a, grad_eq, "grad_eq", op);
  const CudaCall call(a.device);
  const int64_t L = static_cast<int64_t>(a.layers.size());
  std::vector<at::Tensor> out;
  out.reserve(L);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = a.keep[3 * l];
    out.push_back(at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous)));
    a.layers[l].grad = out.back().mutable_data_ptr();
  }
  const DeviceTable t = upload(a, op);
  const auto acc = acc_type_of(a.dtype);
  // Already the accumulation dtype in the usual call, so no conversion kernels run.
  const at::Tensor gp = grad_penalty.to(acc).contiguous(), ge = grad_eq.to(acc).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multi_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_backward_kernel<scalar_t><<<static_cast<unsigned>(t.n_chunks), kThreads, 0, call.stream>>>(
        t.layers, t.chunks, gp.const_data_ptr<acc_t>(), ge.const_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m) {
  m.impl("multi_forward", &projkernels::multi_forward_cuda);
  m.impl("multi_backward", &projkernels::multi_backward_cuda);
}
