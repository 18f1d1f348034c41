// CUDA kernels of the steerable ops (schemas in ops/schemas.cpp, CPU kernels in
// cpu/steerable_kernels.cpp, autograd in autograd/autograd.cpp; the per-block math in
// steerable_math.h, argument checks in steerable_checks.h).
//
// One launch covers every block type: CUDA block i takes global tile i (a run of consecutive
// blocks of one type, steerable_math.h) and finds its type from the descriptor rows.  It stages in
// shared memory, by the rule of steer_staging (the same in every block of a type, and on the host
// that sizes the launch): the tile's coefficients, Q_t^T where it fits next to them, and the tile's
// blocks X, converted to the accumulation dtype, where they fit next to both.  What does not fit is
// read from global memory; coefficients that do not fit go to a global scratch buffer.  Then
//   1. coefficients C = Q_t^T X, one (block, column) pair per warp at a time: the lanes take
//      elements e = lane, lane + 32, ... and the fixed shuffle tree adds them;
//   2. forward: each thread takes elements of the tile, forms the residual x - sum_j C_j Q_t[e, j]
//      and adds its square; the block's fixed tree gives one (penalty, energy) partial per tile, and
//      a second launch adds the partials in tile order.  No atomics, and the partition depends on
//      the layout alone: results are bitwise reproducible across runs and GPUs.
//   2'. write: each thread stores 2 g_pen (x - P x) + 2 g_eq P x at the element's own address (the
//      blocks partition W: every element is written once); g_pen and g_eq are read in the kernel,
//      so the host never syncs.
// Q_t is read transposed (the layout's qt, [r, m] row-major) in both phases: threads and lanes run
// over consecutive e, so consecutive threads read consecutive addresses of column j (coalesced
// from global memory, conflict-free in shared memory), where Q_t [m, r] would put them r apart.
// In-tile indices are 32-bit (plan_launch checks the ranges), and an element's address in W costs
// three 32-bit divisions (block, out field, out channel: steer_block_base, steer_elem_offset); with X
// staged, the forward computes addresses once per element and the coefficient phase none.
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

// A tile as its CUDA block sees it: sizes as 32-bit ints, and where each operand lives.
template <typename acc_t>
struct TileSetup {
  SteerType t;
  int first, nb;        // the tile's blocks [first, first + nb) of its type
  int m, r, run;        // block size, rank, one out channel's run of d_in * S elements
  const acc_t* qt;      // Q_t^T [r, m]: shared, or the layout's copy in global memory
  const acc_t* x;       // the tile's blocks [nb, m] in shared memory; nullptr: gathered from W
  acc_t* c;             // coefficients [nb, r]: shared, or the tile's slice of the global scratch
};

// W-offset of element e of the tile's block b (the block's base, then the element within it).
template <typename acc_t>
__device__ __forceinline__ int64_t tile_addr(const TileSetup<acc_t>& s, const int64_t* __restrict__ fields, int b,
                                             int e, int64_t c_in, int64_t S) {
  return steer_block_base(s.t, fields, s.first + b, c_in, S) + steer_elem_offset(e, s.run, c_in * S);
}

// Finds the tile's type, places its operands (steer_staging) and stages them; ends with a barrier.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ TileSetup<acc_t> setup_tile(const scalar_t* __restrict__ w,
                                                       const acc_t* __restrict__ qt_all,
                                                       const int64_t* __restrict__ fields,
                                                       const int64_t* __restrict__ desc, int n_types, int64_t c_in,
                                                       int64_t S, int64_t shared_elems, acc_t* smem, acc_t* scratch) {
  TileSetup<acc_t> s;
  const int64_t tile = blockIdx.x;
  const int type = steer_type_of_tile(desc, n_types, tile);
  s.t = SteerType::from(desc + static_cast<int64_t>(type) * kSteerDescWidth);
  const SteerTile blocks = steer_tile_blocks(s.t, tile);
  s.first = static_cast<int>(blocks.first);
  s.nb = static_cast<int>(blocks.last - blocks.first);
  s.m = static_cast<int>(s.t.m(S));
  s.r = static_cast<int>(s.t.rank);
  s.run = static_cast<int>(s.t.d_in * S);
  const SteerStaging st = steer_staging(s.t, S, shared_elems);
  // Shared memory: [c | q | x], each at its upper bound for the type (a short last tile uses less).
  s.c = st.c_shared ? smem : scratch + steer_scratch_offset(desc, type, S, shared_elems) + blocks.first * s.r;
  s.qt = qt_all + s.t.q_offset;
  if (st.q > 0) {
    acc_t* qs = smem + st.c;
    for (int i = threadIdx.x; i < s.m * s.r; i += blockDim.x) qs[i] = s.qt[i];
    s.qt = qs;
  }
  s.x = nullptr;
  if (st.x > 0) {
    // Gathered once here: the coefficient phase then reads each element r times from shared memory,
    // not from W, and the forward needs no address afterwards.
    acc_t* xs = smem + st.c + st.q;
    for (int i = threadIdx.x; i < s.nb * s.m; i += blockDim.x) {
      const int b = i / s.m;
      xs[i] = static_cast<acc_t>(w[tile_addr(s, fields, b, i - b * s.m, c_in, S)]);
    }
    s.x = xs;
  }
  __syncthreads();
  return s;
}

// C = Q_t^T X for the tile's blocks, into s.c; ends with a barrier (which also makes coefficients in
// the global scratch visible to the whole block).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_coefficients(const scalar_t* __restrict__ w, const int64_t* __restrict__ fields,
                                                  const TileSetup<acc_t>& s, int64_t c_in, int64_t S) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int pair = warp; pair < s.nb * s.r; pair += kWarps) {
    const int b = pair / s.r, j = pair - b * s.r;
    const acc_t* qj = s.qt + static_cast<int64_t>(j) * s.m;
    acc_t v = 0;
    if (s.x != nullptr) {
      const acc_t* xb = s.x + b * s.m;
      for (int e = lane; e < s.m; e += 32) v += xb[e] * qj[e];
    } else {
      // X did not fit: gather block b from W on each of its r columns (through L1/L2); the block's
      // base is computed once per pair.
      const int64_t base = steer_block_base(s.t, fields, s.first + b, c_in, S), row = c_in * S;
      for (int e = lane; e < s.m; e += 32) v += static_cast<acc_t>(w[base + steer_elem_offset(e, s.run, row)]) * qj[e];
    }
    v = warp_sum(v);
    if (lane == 0) s.c[pair] = v;
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
steer_forward_kernel(const scalar_t* __restrict__ w, const at::opmath_type<scalar_t>* __restrict__ qt_all,
                     const int64_t* __restrict__ fields, const int64_t* __restrict__ desc, int n_types, int64_t c_in,
                     int64_t S, int64_t shared_elems, at::opmath_type<scalar_t>* scratch, int64_t n_tiles,
                     double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double reduce_scratch[kWarps];
  const TileSetup<acc_t> s =
      setup_tile(w, qt_all, fields, desc, n_types, c_in, S, shared_elems, reinterpret_cast<acc_t*>(smem_raw), scratch);
  tile_coefficients<scalar_t, acc_t>(w, fields, s, c_in, S);
  acc_t pen = 0, eq = 0;
  for (int i = threadIdx.x; i < s.nb * s.m; i += blockDim.x) {
    const int b = i / s.m, e = i - b * s.m;
    const acc_t x = s.x != nullptr ? s.x[i] : static_cast<acc_t>(w[tile_addr(s, fields, b, e, c_in, S)]);
    const acc_t d = x - steer_projected(s.c + b * s.r, s.qt + e, s.m, s.r);
    pen += d * d;
  }
  for (int i = threadIdx.x; i < s.nb * s.r; i += blockDim.x) eq += s.c[i] * s.c[i];
  double v = block_sum(static_cast<double>(pen), reduce_scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = v;
  v = block_sum(static_cast<double>(eq), reduce_scratch);
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
steer_write_kernel(const scalar_t* __restrict__ w, const at::opmath_type<scalar_t>* __restrict__ qt_all,
                   const int64_t* __restrict__ fields, const int64_t* __restrict__ desc, int n_types, int64_t c_in,
                   int64_t S, int64_t shared_elems, at::opmath_type<scalar_t>* scratch,
                   const at::opmath_type<scalar_t>* __restrict__ grad_pen,
                   const at::opmath_type<scalar_t>* __restrict__ grad_eq, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TileSetup<acc_t> s =
      setup_tile(w, qt_all, fields, desc, n_types, c_in, S, shared_elems, reinterpret_cast<acc_t*>(smem_raw), scratch);
  tile_coefficients<scalar_t, acc_t>(w, fields, s, c_in, S);
  const acc_t two_pen = 2 * *grad_pen, two_eq = 2 * *grad_eq;
  for (int i = threadIdx.x; i < s.nb * s.m; i += blockDim.x) {
    const int b = i / s.m, e = i - b * s.m;
    const int64_t addr = tile_addr(s, fields, b, e, c_in, S);
    const acc_t x = s.x != nullptr ? s.x[i] : static_cast<acc_t>(w[addr]);
    const acc_t px = steer_projected(s.c + b * s.r, s.qt + e, s.m, s.r);
    out[addr] = static_cast<scalar_t>(steer_write_value(x, px, two_pen, two_eq));
  }
}

// The launch: one block per tile, dynamic shared memory for the largest staging of any type
// (steer_staging), and the global coefficient scratch for the types whose coefficients exceed the
// budget.  shared_elems (the budget in accumulation-dtype numbers) goes to the kernel, which applies
// the same rule to its own type.
struct SteerLaunch {
  unsigned grid;
  int64_t shared_elems, shared_bytes, scratch_elems;
};

SteerLaunch plan_launch(const SteerArgs& a, int64_t acc_size, int64_t shared_budget, const char* op) {
  TORCH_CHECK(a.n_tiles <= std::numeric_limits<int>::max(), op, ": ", a.n_tiles, " tiles exceed the grid limit");
  // Room for a loop's last stride of kThreads past the end.
  constexpr int64_t kIntMax = std::numeric_limits<int>::max() - kThreads;
  SteerLaunch l{static_cast<unsigned>(a.n_tiles), shared_budget / acc_size, 0, 0};
  int64_t need = 0;
  for (size_t i = 0; i < a.types.size(); ++i) {
    const SteerType& t = a.types[i];
    const int64_t m = t.m(a.S);
    // The kernels index within a tile, a block and Q_t in 32 bits (r <= m, so these bound the rest).
    TORCH_CHECK(t.tile_blocks() * m <= kIntMax && m * t.rank <= kIntMax && t.n_blocks() <= kIntMax, op,
                ": block type ", i, " (", t.n_blocks(), " blocks of ", m, " numbers, rank ", t.rank, ", ",
                t.tile_blocks(), " per tile) exceeds the CUDA kernels' 32-bit tile indices");
    need = std::max(need, steer_staging(t, a.S, l.shared_elems).elems());
  }
  l.shared_bytes = need * acc_size;
  l.scratch_elems = steer_scratch_offset(a.desc_host, static_cast<int>(a.types.size()), a.S, l.shared_elems);
  return l;
}

// The global coefficients of the types that shared memory cannot hold (undefined when none: the
// usual case allocates nothing).  Written and read by the same CUDA block only.
at::Tensor coefficient_scratch(const SteerLaunch& l, const at::TensorOptions& acc_options) {
  return l.scratch_elems > 0 ? at::empty({l.scratch_elems}, acc_options) : at::Tensor();
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
    at::Tensor scratch = coefficient_scratch(l, opts);
    steer_forward_kernel<scalar_t><<<l.grid, kThreads, static_cast<size_t>(l.shared_bytes), call.stream>>>(
        w.const_data_ptr<scalar_t>(), a.qt.const_data_ptr<acc_t>(), a.fields.const_data_ptr<int64_t>(),
        a.desc.const_data_ptr<int64_t>(), static_cast<int>(a.types.size()), a.c_in, a.S, l.shared_elems,
        scratch.defined() ? scratch.mutable_data_ptr<acc_t>() : nullptr, a.n_tiles,
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
    at::Tensor scratch = coefficient_scratch(l, gp.options());
    steer_write_kernel<scalar_t><<<l.grid, kThreads, static_cast<size_t>(l.shared_bytes), call.stream>>>(
        w.const_data_ptr<scalar_t>(), a.qt.const_data_ptr<acc_t>(), a.fields.const_data_ptr<int64_t>(),
        a.desc.const_data_ptr<int64_t>(), static_cast<int>(a.types.size()), a.c_in, a.S, l.shared_elems,
        scratch.defined() ? scratch.mutable_data_ptr<acc_t>() : nullptr, gp.const_data_ptr<acc_t>(),
        ge.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
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
  return write_cuda(weight, a, a.zero, a.half, op);
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m) {
  m.impl("steerable_penalty_energy", &projkernels::penalty_energy_cuda);
  m.impl("steerable_penalty_energy_backward", &projkernels::penalty_energy_backward_cuda);
  m.impl("steerable_project", &projkernels::project_cuda);
}
