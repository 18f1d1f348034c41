// CUDA kernels of the steerable ops (schemas, CPU kernels and autograd in steerable_ops.cpp; the
// per-block math in steerable_math.h, argument checks in steerable_checks.h).
//
// One launch covers every block type: CUDA block i takes global tile i (a run of consecutive
// blocks of one type, steerable_math.h) and finds its type from the descriptor rows.  It stages
// Q_t in shared memory when the tile's coefficients and Q_t fit within the device's per-block limit
// (the same rule in every block of that type), and reads Q_t through L2 otherwise.  Then
//   1. coefficients C = Q_t^T X, one (block, column) pair per warp at a time: the lanes take
//      elements e = lane, lane + 32, ... and the fixed shuffle tree adds them;
//   2. forward: each thread takes elements of the tile, forms the residual x - sum_j C_j Q_t[e, j]
//      and adds its square; the block's fixed tree gives one (penalty, energy) partial per tile, and
//      a second launch adds the partials in tile order.  No atomics, and the partition depends on
//      the layout alone: results are bitwise reproducible across runs and GPUs.
//   2'. write: each thread stores 2 g_pen (x - P x) + 2 g_eq P x at the element's own address (the
//      blocks partition W: every element is written once); g_pen and g_eq are read in the kernel,
//      so the host never syncs.
// Half types are read as such and converted in registers; sums are float32 for half and float32
// weights and float64 for float64 weights (at::opmath_type), partials in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "block_reduce.cuh"
#include "cuda_launch.cuh"
#include "steerable_checks.h"
#include "steerable_math.h"

namespace projkernels {
namespace {

// Where a tile's Q_t and coefficients live, decided per block from quantities uniform across it.
template <typename acc_t>
struct TileSetup {
  SteerType t;
  SteerTile blocks;
  int64_t m;
  const acc_t* q;  // shared or global
  acc_t* c;        // shared: [blocks.last - blocks.first, r]
};

template <typename acc_t>
__device__ __forceinline__ TileSetup<acc_t> setup_tile(const acc_t* __restrict__ q_all, const int64_t* __restrict__ desc,
                                                       int n_types, int64_t S, int64_t shared_elems, acc_t* smem) {
  TileSetup<acc_t> s;
  const int64_t tile = blockIdx.x;
  s.t = SteerType::from(desc + static_cast<int64_t>(steer_type_of_tile(desc, n_types, tile)) * kSteerDescWidth);
  s.blocks = steer_tile_blocks(s.t, tile);
  s.m = s.t.m(S);
  const int64_t r = s.t.rank, c_elems = s.t.blocks_per_tile * r;
  s.c = smem;
  s.q = q_all + s.t.q_offset;
  if (c_elems + s.m * r <= shared_elems) {  // the host sized the launch with the same rule
    acc_t* qs = smem + c_elems;
    for (int64_t i = threadIdx.x; i < s.m * r; i += blockDim.x) qs[i] = s.q[i];
    s.q = qs;
  }
  return s;
}

// C = Q_t^T X for the tile's blocks, into s.c; ends with a barrier.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_coefficients(const scalar_t* __restrict__ w, const int64_t* __restrict__ fields,
                                                  const TileSetup<acc_t>& s, int64_t c_in, int64_t S) {
  __syncthreads();  // the staged Q_t is complete
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r = s.t.rank, pairs = (s.blocks.last - s.blocks.first) * r;
  for (int64_t pair = warp; pair < pairs; pair += kWarps) {
    const int64_t b = pair / r, j = pair % r;
    const int64_t base = steer_block_base(s.t, fields, s.blocks.first + b, c_in, S);
    acc_t v = 0;
    for (int64_t e = lane; e < s.m; e += 32)
      v += static_cast<acc_t>(w[base + steer_elem_offset(e, s.t.d_in, c_in, S)]) * s.q[e * r + j];
    v = warp_sum(v);
    if (lane == 0) s.c[pair] = v;
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
steer_forward_kernel(const scalar_t* __restrict__ w, const at::opmath_type<scalar_t>* __restrict__ q_all,
                     const int64_t* __restrict__ fields, const int64_t* __restrict__ desc, int n_types, int64_t c_in,
                     int64_t S, int64_t shared_elems, int64_t n_tiles, double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double scratch[kWarps];
  const TileSetup<acc_t> s = setup_tile(q_all, desc, n_types, S, shared_elems, reinterpret_cast<acc_t*>(smem_raw));
  tile_coefficients<scalar_t, acc_t>(w, fields, s, c_in, S);
  const int64_t r = s.t.rank, n = (s.blocks.last - s.blocks.first) * s.m;
  acc_t pen = 0, eq = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t b = i / s.m, e = i % s.m;
    const int64_t addr = steer_block_base(s.t, fields, s.blocks.first + b, c_in, S) + steer_elem_offset(e, s.t.d_in, c_in, S);
    const acc_t d = static_cast<acc_t>(w[addr]) - steer_projected(s.c + b * r, s.q + e * r, r);
    pen += d * d;
  }
  for (int64_t i = threadIdx.x; i < (s.blocks.last - s.blocks.first) * r; i += blockDim.x) eq += s.c[i] * s.c[i];
  double v = block_sum(static_cast<double>(pen), scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = v;
  v = block_sum(static_cast<double>(eq), scratch);
  if (threadIdx.x == 0) partials[n_tiles + blockIdx.x] = v;
}

// Block j adds column j (0: penalty, 1: energy) of the partials in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
steer_sum_kernel(const double* __restrict__ partials, int64_t n_tiles, acc_t* __restrict__ pen_out,
                 acc_t* __restrict__ eq_out) {
  __shared__ double scratch[kWarps];
  const double* col = partials + static_cast<int64_t>(blockIdx.x) * n_tiles;
  double v = 0;
  for (int64_t i = threadIdx.x; i < n_tiles; i += blockDim.x) v += col[i];
  v = block_sum(v, scratch);
  if (threadIdx.x == 0) *(blockIdx.x == 0 ? pen_out : eq_out) = static_cast<acc_t>(v);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
steer_write_kernel(const scalar_t* __restrict__ w, const at::opmath_type<scalar_t>* __restrict__ q_all,
                   const int64_t* __restrict__ fields, const int64_t* __restrict__ desc, int n_types, int64_t c_in,
                   int64_t S, int64_t shared_elems, const at::opmath_type<scalar_t>* __restrict__ grad_pen,
                   const at::opmath_type<scalar_t>* __restrict__ grad_eq, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TileSetup<acc_t> s = setup_tile(q_all, desc, n_types, S, shared_elems, reinterpret_cast<acc_t*>(smem_raw));
  tile_coefficients<scalar_t, acc_t>(w, fields, s, c_in, S);
  const acc_t two_pen = 2 * *grad_pen, two_eq = 2 * *grad_eq;
  const int64_t r = s.t.rank, n = (s.blocks.last - s.blocks.first) * s.m;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t b = i / s.m, e = i % s.m;
    const int64_t addr = steer_block_base(s.t, fields, s.blocks.first + b, c_in, S) + steer_elem_offset(e, s.t.d_in, c_in, S);
    const acc_t px = steer_projected(s.c + b * r, s.q + e * r, r);
    out[addr] = static_cast<scalar_t>(steer_write_value(static_cast<acc_t>(w[addr]), px, two_pen, two_eq));
  }
}

// The launch: one block per tile, dynamic shared memory for the largest tile's coefficients plus
// Q_t where it fits.  shared_elems (the budget in accumulation-dtype numbers) goes to the kernel,
// which applies the same rule to its own type.
struct SteerLaunch {
  unsigned grid;
  int64_t shared_elems, shared_bytes;
};

SteerLaunch plan_launch(const SteerArgs& a, int64_t acc_size, int64_t shared_budget, const char* op) {
  TORCH_CHECK(a.n_tiles <= std::numeric_limits<int>::max(), op, ": ", a.n_tiles, " tiles exceed the grid limit");
  SteerLaunch l{static_cast<unsigned>(a.n_tiles), shared_budget / acc_size, 0};
  int64_t need = 0;
  for (const SteerType& t : a.types) {
    const int64_t c = t.blocks_per_tile * t.rank, qn = t.m(a.S) * t.rank;
    TORCH_CHECK(c <= l.shared_elems, op, ": a tile's ", c, " coefficients do not fit in shared memory (",
                shared_budget, " bytes)");
    need = std::max(need, c + qn <= l.shared_elems ? c + qn : c);
  }
  l.shared_bytes = need * acc_size;
  return l;
}

std::tuple<at::Tensor, at::Tensor> penalty_energy_cuda(const at::Tensor& weight, at::TensorList table,
                                                       at::IntArrayRef geometry) {
  constexpr const char* op = "projkernels_C::steerable_penalty_energy";
  const SteerArgs a = check_steerable(weight, table, geometry, op);
  const CudaCall call(weight.device());
  const at::Tensor w = weight.contiguous();
  const auto acc = acc_type_of(w.scalar_type());
  const auto opts = weight.options().dtype(acc);
  at::Tensor pen = at::empty({}, opts), eq = at::empty({}, opts);
  at::Tensor partials = at::empty({2, a.n_tiles}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "steerable_penalty_energy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SteerLaunch l = plan_launch(a, sizeof(acc_t), call.shared_budget, op);
    steer_forward_kernel<scalar_t><<<l.grid, kThreads, static_cast<size_t>(l.shared_bytes), call.stream>>>(
        w.const_data_ptr<scalar_t>(), a.q.const_data_ptr<acc_t>(), a.fields.const_data_ptr<int64_t>(),
        a.desc.const_data_ptr<int64_t>(), static_cast<int>(a.types.size()), a.c_in, a.S, l.shared_elems, a.n_tiles,
        partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    steer_sum_kernel<acc_t><<<2, kThreads, 0, call.stream>>>(partials.const_data_ptr<double>(), a.n_tiles,
                                                             pen.mutable_data_ptr<acc_t>(), eq.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pen, eq};
}

at::Tensor write_cuda(const at::Tensor& weight, const SteerArgs& a, const at::Tensor& grad_pen,
                      const at::Tensor& grad_eq, const char* op) {
  const CudaCall call(weight.device());
  const at::Tensor w = weight.contiguous();
  const auto acc = acc_type_of(w.scalar_type());
  // Device-side scalars: read in the kernel, so the host never waits for them.
  const at::Tensor gp = grad_pen.reshape({}).to(acc), ge = grad_eq.reshape({}).to(acc);
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "steerable_write_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SteerLaunch l = plan_launch(a, sizeof(acc_t), call.shared_budget, op);
    steer_write_kernel<scalar_t><<<l.grid, kThreads, static_cast<size_t>(l.shared_bytes), call.stream>>>(
        w.const_data_ptr<scalar_t>(), a.q.const_data_ptr<acc_t>(), a.fields.const_data_ptr<int64_t>(),
        a.desc.const_data_ptr<int64_t>(), static_cast<int>(a.types.size()), a.c_in, a.S, l.shared_elems,
        gp.const_data_ptr<acc_t>(), ge.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor penalty_energy_backward_cuda(const at::Tensor& weight, const at::Tensor& grad_penalty,
                                        const at::Tensor& grad_eq, at::TensorList table, at::IntArrayRef geometry) {
  constexpr const char* op = "projkernels_C::steerable_penalty_energy_backward";
  const SteerArgs a = check_steerable_backward(weight, grad_penalty, grad_eq, table, geometry, op);
  return write_cuda(weight, a, grad_penalty, grad_eq, op);
}

at::Tensor project_cuda(const at::Tensor& weight, at::TensorList table, at::IntArrayRef geometry) {
  constexpr const char* op = "projkernels_C::steerable_project";
  const SteerArgs a = check_steerable(weight, table, geometry, op);
  // P W is the write with g_pen = 0, g_eq = 1/2: the layout's cached constants, no new tensors.
  return write_cuda(weight, a, table[3], table[4], op);
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m) {
  m.impl("steerable_penalty_energy", &projkernels::penalty_energy_cuda);
  m.impl("steerable_penalty_energy_backward", &projkernels::penalty_energy_backward_cuda);
  m.impl("steerable_project", &projkernels::project_cuda);
}
