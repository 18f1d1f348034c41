// CUDA kernels of the single-weight ops (schemas in ops/schemas.cpp, CPU kernels in
// cpu/orbit_kernels.cpp).  The per-orbit math is
// orbit_math.h, the chunk walks multi_math.h, the launch plan launch_plan.h: the CPU kernels and
// the C++ unit tests run the same code.
//
// Forward: the orbits are cut into chunks whose size depends only on the problem (orbit count,
// group order, dtype; launch_plan.h), one block per chunk, so a large weight launches many waves
// on any GPU.  A block's threads walk its chunk (thread t takes orbits t, t + blockDim, ...) and
// their sums go through the fixed warp-shuffle / shared-memory tree into one entry per column of
// the column-major partials [columns, chunks]; a second launch with one block per column adds a
// column in a fixed order, and (spectrum only) a third maps rows to irreps.  The partition of
// every sum is a function of the problem alone, so results are bitwise identical run to run and
// across GPUs; there are no atomics, no host syncs and no weight-sized temporaries.
//
// Backward: the same chunks; each orbit is read once and its dW written once.
//
// Tiles (PROJKERNELS_TILED=1 in the environment; off by default, launch_plan.h): where a weight has the standard layout
// and a few blocks fit in shared memory, a CUDA block instead owns a tile of whole
// (out-field, in-field) blocks, reads it with coalesced 16-byte loads into shared memory, resolves
// the orbits there, and (backward) writes the tile back the same way, so no thread issues
// scattered partial-sector loads or stores.  The forward is tiled with or without the spectrum
// (so the penalty has the same bits either way), the backward for the array classes
// (|G| <= kMaxArrayOrder; the streamed backward takes the chunked path).  Whether a weight is
// tiled depends only on the problem, so results stay reproducible across GPUs.  The chunked path is
// the default because it measured faster: on an H200 (2026-11-26, C4 regular 2048x2048x3x3 fp32)
// forward 88 us chunked against 114 us tiled and backward 96 against 120 us, and likewise in 7 of
// the 8 kernel/case pairs of bench/gpu_check.sh (bench/RESULTS.md).  PROJKERNELS_TILED=1 (read once
// per process) selects the tiled path.
//
// Group orders: one switch (static_switch.h) for every kernel; any order up to kMaxGroupOrder
// launches, the orders above kMaxArrayOrder through the streamed class.  Shared memory is sized in
// one place (plan_shared) within the device's per-block limit; a table that does not fit is read
// from global memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "block_reduce.cuh"
#include "cuda_launch.cuh"
#include "launch_plan.h"
#include "multi_math.h"
#include "op_checks.h"
#include "orbit_math.h"
#include "static_switch.h"

#ifndef PROJKERNELS_TILED
#define PROJKERNELS_TILED 1
#endif

namespace projkernels {
namespace {

template <typename T>
__device__ __forceinline__ const T* stage(void* dst, const T* src, int64_t n) {
  T* s = static_cast<T*>(dst);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s[i] = src[i];
  return s;
}

// Orbits [first, last) of chunk blockIdx.x.
__device__ __forceinline__ int64_t chunk_first(int64_t chunk_orbits) {
  return static_cast<int64_t>(blockIdx.x) * chunk_orbits;
}
__device__ __forceinline__ int64_t chunk_last(int64_t chunk_orbits, int64_t n_orbits) {
  const int64_t end = chunk_first(chunk_orbits) + chunk_orbits;
  return end < n_orbits ? end : n_orbits;
}

// Sums over the orbits first, first + blockDim, ... < last of this thread (threadIdx.x added by the
// caller), reduced over the block by the fixed tree into column j of one partial: col[j * n_parts]
// for j = 0 (penalty), 1 (eq energy) and, with SPECTRUM, 1 + r (row r).
template <typename scalar_t, int K, bool SPECTRUM, int B = 1, typename off_t = int32_t>
__device__ __forceinline__ void reduce_orbits(const LayerDesc& d, const off_t* __restrict__ offs,
                                              const at::opmath_type<scalar_t>* __restrict__ bas, int64_t first,
                                              int64_t last, double* __restrict__ col, int64_t n_parts,
                                              double* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int G = order_of(K, d.G);
  // Row energies live in registers for the array classes; the streamed class walks rows outermost.
  constexpr bool kRows = SPECTRUM && K != 0;
  constexpr int kRowCount = kRows ? array_bound(K) : 1;
  acc_t pen = 0, eq = 0;
  acc_t rows[kRowCount];
#pragma unroll
  for (int r = 0; r < kRowCount; ++r) rows[r] = 0;
  chunk_energies<K, kRows, scalar_t, acc_t, acc_t, acc_t, B>(d, offs, first, last, blockDim.x, pen, eq, bas, rows);

  double v = block_sum(static_cast<double>(pen), scratch);
  if (threadIdx.x == 0) col[0] = v;
  v = block_sum(static_cast<double>(eq), scratch);
  if (threadIdx.x == 0) col[n_parts] = v;
  if constexpr (kRows) {
    constexpr int MAXG = array_bound(K);
    PK_UNROLL
    for (int r = 1; r < loop_bound(MAXG, G); ++r) {
      if (r >= G) continue;  // G is the same in every thread, so every thread reaches the same syncs
      v = block_sum(static_cast<double>(rows[r]), scratch);
      if (threadIdx.x == 0) col[(1 + r) * n_parts] = v;
    }
  } else if constexpr (SPECTRUM) {
    for (int r = 1; r < G; ++r) {
      const acc_t e = chunk_row_energy<scalar_t, acc_t>(d, offs, first, last, blockDim.x, bas + int64_t(r) * G);
      v = block_sum(static_cast<double>(e), scratch);
      if (threadIdx.x == 0) col[(1 + r) * n_parts] = v;
    }
  }
}

// off_t: int32_t, or SignedOffset for a table with negative offsets (orbit_math.h, SIGNED_SWITCH).
template <typename scalar_t, int K, bool SPECTRUM, int B = 1, typename off_t = int32_t>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const LayerDesc d, const at::opmath_type<scalar_t>* __restrict__ basis, int64_t chunk_orbits,
               int64_t n_chunks, SharedPlan plan, double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double scratch[kWarps];
  const int G = order_of(K, d.G);
  const acc_t* bas = plan.stage_basis() ? stage(smem, basis, int64_t(G) * G) : basis;
  const off_t* table = reinterpret_cast<const off_t*>(d.offsets);
  const off_t* offs =
      plan.stage_offsets() ? stage(smem + plan.basis_bytes, table, d.orbits_per_block * G) : table;
  __syncthreads();
  reduce_orbits<scalar_t, K, SPECTRUM, B, off_t>(d, offs, bas, chunk_first(chunk_orbits) + threadIdx.x,
                                       chunk_last(chunk_orbits, d.n_orbits), partials + blockIdx.x, n_chunks, scratch);
}

// Block j adds column j of the partials in a fixed order (thread t takes chunks t, t + blockDim,
// ..., then the fixed tree).  Columns 0 and 1 are also the penalty and eq outputs; without a
// spectrum, block 0 zeroes the spectrum output (so no separate fill is launched).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
column_sum_kernel(const double* __restrict__ partials, int64_t n_chunks, double* __restrict__ totals,
                  acc_t* __restrict__ pen_out, acc_t* __restrict__ eq_out, acc_t* __restrict__ spec_out,
                  int n_zero_spec) {
  __shared__ double scratch[kWarps];
  const double* col = partials + static_cast<int64_t>(blockIdx.x) * n_chunks;
  double s = 0;
  // Unrolled for loads in flight; the adds stay in sequence, so the order is unchanged.
#pragma unroll 8
  for (int64_t i = threadIdx.x; i < n_chunks; i += blockDim.x) s += col[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    totals[blockIdx.x] = s;
    if (blockIdx.x == 0) *pen_out = static_cast<acc_t>(s);
    if (blockIdx.x == 1) *eq_out = static_cast<acc_t>(s);
  }
  if (blockIdx.x == 0)
    for (int k = threadIdx.x; k < n_zero_spec; k += blockDim.x) spec_out[k] = acc_t(0);
}

// spectrum[k] = (k == 0 ? eq : 0) + the row totals of irrep k in row order (as rows_to_irreps).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
spectrum_kernel(const double* __restrict__ totals, int G, const int64_t* __restrict__ row_irrep, int n_irreps,
                acc_t* __restrict__ spec_out) {
  for (int k = threadIdx.x; k < n_irreps; k += blockDim.x) {
    double s = k == 0 ? totals[1] : 0.0;
    for (int r = 1; r < G; ++r)
      if (row_irrep[r] == k) s += totals[1 + r];
    spec_out[k] = static_cast<acc_t>(s);
  }
}

template <typename scalar_t, int K, int B = 1, typename off_t = int32_t>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const LayerDesc d, int64_t chunk_orbits, SharedPlan plan,
                const at::opmath_type<scalar_t>* __restrict__ grad_pen,
                const at::opmath_type<scalar_t>* __restrict__ grad_eq) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int G = order_of(K, d.G);
  const off_t* table = reinterpret_cast<const off_t*>(d.offsets);
  const off_t* offs = plan.stage_offsets() ? stage(smem, table, d.orbits_per_block * G) : table;
  __syncthreads();
  const acc_t two_pen = acc_t(2) * *grad_pen, two_eq = acc_t(2) * *grad_eq;
  chunk_gradient<K, scalar_t, acc_t, B>(d, offs, chunk_first(chunk_orbits) + threadIdx.x,
                                        chunk_last(chunk_orbits, d.n_orbits), blockDim.x, two_pen, two_eq);
}

// --- tiled kernels --------------------------------------------------------------------------

// Copies `so` segments of `pitch` entries (src segment a at src + a * src_stride, dst segment a at
// dst + a * dst_stride); consecutive threads take consecutive 16-byte vectors where every segment
// start is 16-byte aligned, else consecutive entries.  Indices are 32-bit: a tile is < 2^31 entries.
template <typename scalar_t>
__device__ __forceinline__ void copy_segments(const scalar_t* __restrict__ src, int64_t src_stride,
                                              scalar_t* __restrict__ dst, int64_t dst_stride, int64_t so,
                                              int64_t pitch) {
  constexpr int64_t V = 16 / sizeof(scalar_t);
  const bool vec = reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
                   src_stride % V == 0 && dst_stride % V == 0 && pitch % V == 0;
  if (vec) {
    const uint32_t per = static_cast<uint32_t>(pitch / V), total = static_cast<uint32_t>(so) * per;
#pragma unroll 4
    for (uint32_t i = threadIdx.x; i < total; i += blockDim.x) {
      const uint32_t a = i / per, r = i - a * per;
      reinterpret_cast<int4*>(dst + a * dst_stride)[r] = reinterpret_cast<const int4*>(src + a * src_stride)[r];
    }
  } else {
    const uint32_t per = static_cast<uint32_t>(pitch), total = static_cast<uint32_t>(so) * per;
#pragma unroll 4
    for (uint32_t i = threadIdx.x; i < total; i += blockDim.x) {
      const uint32_t a = i / per, r = i - a * per;
      dst[a * dst_stride + r] = src[a * src_stride + r];
    }
  }
}

// Tile blockIdx.x in shared memory: [remapped offsets][so segments of pitch entries].  `bad` (the
// same in every thread) says that some offset does not fit the tile layout; the block then reads
// from global memory.
template <typename scalar_t, typename off_t = int32_t>
struct StagedTile {
  Tile t;
  const off_t* offs;  // remapped, in the table's encoding (remap_offset keeps the signs)
  scalar_t* tile;
  int64_t n_local;  // the tile's orbits
  bool bad;
};

template <typename scalar_t, typename off_t = int32_t>
__device__ __forceinline__ StagedTile<scalar_t, off_t> stage_tile(const LayerDesc& d, const TilePlan& tp, int G,
                                                                  unsigned char* smem) {
  const Tile t = tile_at(tp, blockIdx.x, d.c_in, d.stride_in, d.orbits_per_block);
  int32_t* s_offs = reinterpret_cast<int32_t*>(smem);
  scalar_t* s_tile = reinterpret_cast<scalar_t*>(smem + tp.offsets_bytes);
  int bad = 0;
  const int64_t n = d.orbits_per_block * G;
  const off_t* table = reinterpret_cast<const off_t*>(d.offsets);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    int32_t v = 0;
    if (!remap_offset(table[i], tp.row_len, d.stride_in, tp.so, t.pitch, &v)) bad = 1;
    s_offs[i] = v;
  }
  const scalar_t* w = static_cast<const scalar_t*>(d.weight);
  copy_segments(w + tile_global_index(t, 0, 0, d.stride_out, tp.row_len, d.stride_in), tp.row_len, s_tile, t.pitch,
                tp.so, t.pitch);
  return {t, reinterpret_cast<const off_t*>(s_offs), s_tile, t.width * d.orbits_per_block,
          __syncthreads_or(bad) != 0};
}

// The basis (spectrum only) is read from global memory: shared memory holds the tile.
template <typename scalar_t, int K, bool SPECTRUM, typename off_t = int32_t>
__global__ void __launch_bounds__(kThreads)
tiled_forward_kernel(const LayerDesc d, const TilePlan tp, const at::opmath_type<scalar_t>* __restrict__ basis,
                     double* __restrict__ partials) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double scratch[kWarps];
  const StagedTile<scalar_t, off_t> s = stage_tile<scalar_t, off_t>(d, tp, order_of(K, d.G), smem);
  double* col = partials + blockIdx.x;
  if (!s.bad) {
    reduce_orbits<scalar_t, K, SPECTRUM, 1, off_t>(tile_desc(d, s.t, s.tile, nullptr), s.offs, basis, threadIdx.x,
                                                   s.n_local, col, tp.n_tiles, scratch);
  } else {
    reduce_orbits<scalar_t, K, SPECTRUM, 1, off_t>(d, reinterpret_cast<const off_t*>(d.offsets), basis,
                                                   s.t.first_orbit + threadIdx.x,
                                         s.t.first_orbit + s.n_local, col, tp.n_tiles, scratch);
  }
}

template <typename scalar_t, int K, typename off_t = int32_t>
__global__ void __launch_bounds__(kThreads)
tiled_backward_kernel(const LayerDesc d, const TilePlan tp, const at::opmath_type<scalar_t>* __restrict__ grad_pen,
                      const at::opmath_type<scalar_t>* __restrict__ grad_eq) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const StagedTile<scalar_t, off_t> s = stage_tile<scalar_t, off_t>(d, tp, order_of(K, d.G), smem);
  const acc_t two_pen = acc_t(2) * *grad_pen, two_eq = acc_t(2) * *grad_eq;
  if (!s.bad) {
    // Every entry of a block lies on one of its orbits, so the whole tile is overwritten with dW.
    chunk_gradient_in_place<K, scalar_t, acc_t>(tile_desc(d, s.t, s.tile, s.tile), s.offs, threadIdx.x, s.n_local,
                                                blockDim.x, two_pen, two_eq);
    __syncthreads();
    scalar_t* out = static_cast<scalar_t*>(d.out);
    copy_segments(static_cast<const scalar_t*>(s.tile), s.t.pitch,
                  out + tile_global_index(s.t, 0, 0, d.stride_out, tp.row_len, d.stride_in), tp.row_len, tp.so,
                  s.t.pitch);
  } else {
    chunk_gradient<K, scalar_t, acc_t>(d, reinterpret_cast<const off_t*>(d.offsets), s.t.first_orbit + threadIdx.x,
                                       s.t.first_orbit + s.n_local, blockDim.x, two_pen, two_eq);
  }
}

// Whether this build tiles and the process asked for the tiled path (PROJKERNELS_TILED=1).
bool tiles_enabled() {
#if PROJKERNELS_TILED
  static const bool on = [] {
    const char* v = std::getenv("PROJKERNELS_TILED");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
#else
  return false;
#endif
}

// A tile lives whole in shared memory: where the device's budget cannot hold one (no current GPU:
// tiles take at most 32 KiB, every GPU since Kepler gives a block 48 KiB), the weight runs chunked.
TilePlan tile_plan(const LayerDesc& d, int64_t c_out, int64_t elem_bytes, int64_t shared_budget, const char* op) {
  if (!tiles_enabled()) return TilePlan{};
  const TilePlan tp = plan_tiles(c_out, d.c_in, d.stride_out, d.stride_in, d.orbits_per_block, d.G, elem_bytes);
  if (tp.ok && tp.shared_bytes() > shared_budget) return TilePlan{};
  TORCH_CHECK(!tp.ok || tp.n_tiles <= std::numeric_limits<int32_t>::max(), op, ": too many tiles for one launch (",
              tp.n_tiles, ")");
  return tp;
}

// The chunking of one weight and its launch size.
struct Chunks {
  int64_t orbits, count;
  Chunks(const LayerDesc& d, int64_t elem_bytes, const char* op)
      : orbits(plan_chunk_orbits(d.n_orbits, d.G, elem_bytes, kThreads)), count(ceil_div(d.n_orbits, orbits)) {
    TORCH_CHECK(count <= std::numeric_limits<int32_t>::max(), op, ": too many orbits for one launch (", d.n_orbits,
                ")");
  }
};

SharedPlan plan_for(const LayerDesc& d, const Chunks& c, int64_t elem_bytes, int64_t acc_bytes, bool spectrum,
                    int64_t budget) {
  const SharedPlan p = plan_shared(d.G, d.orbits_per_block, acc_bytes, spectrum, c.orbits * d.G * elem_bytes, budget);
  TORCH_INTERNAL_ASSERT(p.total() <= budget, "shared memory plan above the device limit");
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cuda(
    const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& inv_stab, const at::Tensor& basis,
    const at::Tensor& row_irrep, int64_t n_irreps, int64_t c_out, int64_t c_in, int64_t stride_out,
    int64_t stride_in, int64_t signed_offsets, bool with_spectrum) {
  constexpr const char* op = "projkernels_C::fused_forward";
  const OrbitArgs t = check_fused_forward(weight, offsets, inv_stab, basis, row_irrep, n_irreps, c_out, c_in,
                                          stride_out, stride_in, signed_offsets != 0);
  const CudaCall call(weight.device());
  const at::Tensor w = weight.contiguous();
  const auto acc = acc_type_of(w.scalar_type());
  const LayerDesc d = describe(t, w, nullptr);
  const Chunks chunks(d, w.element_size(), op);
  // Tiled or not regardless of with_spectrum: the penalty comes out the same bits either way.
  const TilePlan tp = tile_plan(d, t.c_out, w.element_size(), call.shared_budget, op);
  const int G = d.G;
  const int64_t cols = with_spectrum ? G + 1 : 2;
  const int64_t parts = tp.ok ? tp.n_tiles : chunks.count;  // one partial sum per tile or chunk

  at::Tensor pen = at::empty({}, w.options().dtype(acc));
  at::Tensor eq = at::empty({}, w.options().dtype(acc));
  at::Tensor spec = at::empty({n_irreps}, w.options().dtype(acc));
  at::Tensor partials = at::empty({cols, parts}, w.options().dtype(at::kDouble));
  at::Tensor totals = at::empty({cols}, w.options().dtype(at::kDouble));
  const at::Tensor basis_acc = with_spectrum ? basis.to(acc).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fused_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SharedPlan plan = plan_for(d, chunks, w.element_size(), sizeof(acc_t), with_spectrum, call.shared_budget);
    const acc_t* basis_ptr = with_spectrum ? basis_acc.const_data_ptr<acc_t>() : nullptr;
    SIGNED_SWITCH(t.signed_offsets, OFF, [&] {
    GROUP_ORDER_SWITCH(G, K, [&] {
      if (tp.ok) {
        auto kernel = with_spectrum ? tiled_forward_kernel<scalar_t, K, true, OFF>
                                    : tiled_forward_kernel<scalar_t, K, false, OFF>;
        kernel<<<static_cast<unsigned>(tp.n_tiles), kThreads, static_cast<size_t>(tp.shared_bytes()), call.stream>>>(
            d, tp, basis_ptr, partials.mutable_data_ptr<double>());
      } else {
        auto kernel = with_spectrum ? forward_kernel<scalar_t, K, true, 1, OFF> : forward_kernel<scalar_t, K, false, 1, OFF>;
        if constexpr (forward_batch(K) > 1) {
          // Only where a thread walks a whole batch: the batched kernel costs registers either way.
          if (!with_spectrum && orbit_batching() && chunks.orbits >= forward_batch(K) * kThreads)
            kernel = forward_kernel<scalar_t, K, false, forward_batch(K), OFF>;
        }
        kernel<<<static_cast<unsigned>(chunks.count), kThreads, static_cast<size_t>(plan.total()), call.stream>>>(
            d, basis_ptr, chunks.orbits, chunks.count, plan, partials.mutable_data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    });
    column_sum_kernel<acc_t><<<static_cast<unsigned>(cols), kThreads, 0, call.stream>>>(
        partials.const_data_ptr<double>(), parts, totals.mutable_data_ptr<double>(),
        pen.mutable_data_ptr<acc_t>(), eq.mutable_data_ptr<acc_t>(), spec.mutable_data_ptr<acc_t>(),
        with_spectrum ? 0 : static_cast<int>(n_irreps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (with_spectrum) {
      const at::Tensor row_irrep_c = row_irrep.contiguous();
      spectrum_kernel<acc_t><<<1, kThreads, 0, call.stream>>>(totals.const_data_ptr<double>(), G,
                                                               row_irrep_c.const_data_ptr<int64_t>(),
                                                               static_cast<int>(n_irreps), spec.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {pen, eq, spec};
}

// A function template, so that `if constexpr` drops the tiled launch of the streamed class.
template <typename scalar_t, int K, typename off_t>
void launch_backward(const LayerDesc& d, const TilePlan& tp, const Chunks& chunks, const SharedPlan& plan,
                     const CudaCall& call, const at::opmath_type<scalar_t>* gp, const at::opmath_type<scalar_t>* ge) {
  if constexpr (K != 0) {
    if (tp.ok) {
      tiled_backward_kernel<scalar_t, K, off_t>
          <<<static_cast<unsigned>(tp.n_tiles), kThreads, static_cast<size_t>(tp.shared_bytes()), call.stream>>>(
              d, tp, gp, ge);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  auto kernel = backward_kernel<scalar_t, K, 1, off_t>;
  if constexpr (backward_batch(K) > 1) {
    if (orbit_batching() && chunks.orbits >= backward_batch(K) * kThreads)
      kernel = backward_kernel<scalar_t, K, backward_batch(K), off_t>;
  }
  kernel<<<static_cast<unsigned>(chunks.count), kThreads, static_cast<size_t>(plan.total()), call.stream>>>(
      d, chunks.orbits, plan, gp, ge);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fused_backward_cuda(const at::Tensor& weight, const at::Tensor& grad_penalty, const at::Tensor& grad_eq,
                               const at::Tensor& offsets, const at::Tensor& inv_stab, int64_t c_out, int64_t c_in,
                               int64_t stride_out, int64_t stride_in, int64_t signed_offsets) {
  constexpr const char* op = "projkernels_C::fused_backward";
  const OrbitArgs t = check_fused_backward(weight, grad_penalty, grad_eq, offsets, inv_stab, c_out, c_in, stride_out,
                                           stride_in, signed_offsets != 0);
  const CudaCall call(weight.device());
  const at::Tensor w = weight.contiguous();
  const auto acc = acc_type_of(w.scalar_type());
  // Device-side scalars: reading them in the kernel avoids a host sync.
  const at::Tensor gp = grad_penalty.reshape({}).to(acc), ge = grad_eq.reshape({}).to(acc);
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  const LayerDesc d = describe(t, w, out.mutable_data_ptr());
  const Chunks chunks(d, w.element_size(), op);
  // The streamed class is never tiled in the backward (it would read entries it already wrote).
  const TilePlan tp =
      group_order_class(d.G) != 0 ? tile_plan(d, t.c_out, w.element_size(), call.shared_budget, op) : TilePlan{};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fused_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SharedPlan plan = plan_for(d, chunks, w.element_size(), sizeof(acc_t), false, call.shared_budget);
    SIGNED_SWITCH(t.signed_offsets, OFF, [&] {
      GROUP_ORDER_SWITCH(d.G, K, [&] {
        launch_backward<scalar_t, K, OFF>(d, tp, chunks, plan, call, gp.const_data_ptr<acc_t>(),
                                          ge.const_data_ptr<acc_t>());
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m) {
  m.impl("fused_forward", &projkernels::fused_forward_cuda);
  m.impl("fused_backward", &projkernels::fused_backward_cuda);
}
