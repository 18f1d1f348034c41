// Kernels that check the emulated device itself (tests/test_cuda_emulated.py): a correct block
// reduction and a correct exchange through shared memory, and the mistakes it must report (a
// shared-memory overrun, a shuffle that half a warp skips), show (a read of shared memory nobody
// wrote, the same exchange without its barrier) or refuse (a launch above the shared-memory limit).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "block_reduce.cuh"
#include "cuda_launch.cuh"
#include "orbit_math.h"

namespace projkernels {
namespace {

// out[block] = the block's sum of x through the project's fixed block tree.
__global__ void __launch_bounds__(kThreads) sum_kernel(const double* __restrict__ x, double* __restrict__ out) {
  __shared__ double scratch[kWarps];
  const double v = block_sum(x[blockIdx.x * blockDim.x + threadIdx.x], scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// Every thread writes its slot of dynamic shared memory; with `past` one thread writes one beyond.
__global__ void __launch_bounds__(kThreads) overrun_kernel(int past) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[threadIdx.x + (threadIdx.x == kThreads - 1 ? past : 0)] = 1.0f;
}

// Lanes 0-15 of each warp shuffle with a full mask; lanes 16-31 never do: a hang on a GPU.
__global__ void __launch_bounds__(kThreads) half_warp_kernel(float* __restrict__ out) {
  float v = 1.0f;
  if ((threadIdx.x & 31) < 16) v = warp_sum(v);
  out[threadIdx.x] = v;
}

// Each thread writes its slot, then reads the next warp's slot: with `sync` after a barrier, else
// racing the warp that writes it.
__global__ void __launch_bounds__(kThreads) neighbour_kernel(float* __restrict__ out, int sync) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (sync) __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = s[(threadIdx.x + 32) % kThreads];
}

// Reads static shared memory that no thread of the block wrote (block 0 writes it for block 1 to
// find, as the static array outlives a block in the emulation, not on a GPU).
__global__ void __launch_bounds__(kThreads) unwritten_static_kernel(float* __restrict__ out) {
  __shared__ float s[kThreads];
  out[blockIdx.x * kThreads + threadIdx.x] = s[threadIdx.x];
  __syncthreads();
  s[threadIdx.x] = 1.0f;
}

// Reads dynamic shared memory that no thread wrote.
__global__ void __launch_bounds__(kThreads) unwritten_kernel(float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  out[threadIdx.x] = reinterpret_cast<const float*>(smem_raw)[threadIdx.x];
}

// The bound of the orbit loops as a kernel sees it: the device branch of loop_bound (nvcc's device
// pass, which build.py reproduces), where unrolled classes loop to their array bound.
__global__ void loop_bound_kernel(int64_t* __restrict__ out, int maxg, int G) {
  if (threadIdx.x == 0) out[0] = loop_bound(maxg, G);
}

at::Tensor block_sums(const at::Tensor& x) {
  const CudaCall call(x.device());
  at::Tensor out = at::empty({x.numel() / kThreads}, x.options());
  sum_kernel<<<static_cast<unsigned>(out.numel()), kThreads, 0, call.stream>>>(x.const_data_ptr<double>(),
                                                                                out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void overrun(int64_t past) {
  const CudaCall call(c10::Device(c10::kCPU));
  overrun_kernel<<<2, kThreads, kThreads * sizeof(float), call.stream>>>(static_cast<int>(past));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor half_warp(const at::Tensor& like) {
  const CudaCall call(like.device());
  at::Tensor out = at::empty({kThreads}, like.options().dtype(at::kFloat));
  half_warp_kernel<<<1, kThreads, 0, call.stream>>>(out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor neighbour(const at::Tensor& like, int64_t sync) {
  const CudaCall call(like.device());
  at::Tensor out = at::empty({2 * kThreads}, like.options().dtype(at::kFloat));
  neighbour_kernel<<<2, kThreads, kThreads * sizeof(float), call.stream>>>(out.mutable_data_ptr<float>(),
                                                                          static_cast<int>(sync));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unwritten_static(const at::Tensor& like) {
  const CudaCall call(like.device());
  at::Tensor out = at::empty({2 * kThreads}, like.options().dtype(at::kFloat));
  unwritten_static_kernel<<<2, kThreads, 0, call.stream>>>(out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unwritten(const at::Tensor& like, int64_t shared_bytes) {
  const CudaCall call(like.device());
  at::Tensor out = at::empty({kThreads}, like.options().dtype(at::kFloat));
  unwritten_kernel<<<1, kThreads, static_cast<size_t>(shared_bytes), call.stream>>>(out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

int64_t device_loop_bound(int64_t maxg, int64_t G) {
  const CudaCall call(c10::Device(c10::kCPU));
  int64_t out = -1;
  loop_bound_kernel<<<1, 32, 0, call.stream>>>(&out, static_cast<int>(maxg), static_cast<int>(G));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m) {
  m.impl("block_sums", &projkernels::block_sums);
  m.impl("overrun", &projkernels::overrun);
  m.impl("half_warp", &projkernels::half_warp);
  m.impl("neighbour", &projkernels::neighbour);
  m.impl("unwritten", &projkernels::unwritten);
  m.impl("unwritten_static", &projkernels::unwritten_static);
  m.impl("device_loop_bound", &projkernels::device_loop_bound);
}
