// CUDA kernels of the projkernels_C ops (schemas in ops.cpp).
//
// Forward: one thread per orbit in a grid-stride loop; each weight entry is read once (an entry
// with a non-trivial stabiliser is read |Stab| times by its own thread, from cache).  Per-thread
// sums go through a fixed warp-shuffle / shared-memory tree into one row of a small
// [blocks, |G| + 1] partials buffer, and a single-block kernel adds those rows in a fixed order.
// The grid size depends only on the orbit count, so results are bitwise identical run to run
// (and across GPUs); there are no atomics, no host syncs and no weight-sized temporaries.
//
// Backward: one thread per orbit, reading the orbit once and writing dW once.
//
// Kernels are instantiated for |G| <= 4, 16 and 64; up to 16 their loops are unrolled and the
// orbit lives in registers (orbit_math.h, PK_UNROLL).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "block_reduce.cuh"
#include "op_checks.h"
#include "orbit_math.h"

namespace projkernels {
namespace {

constexpr int64_t kMaxForwardBlocks = 1024;  // also the partials buffer's row count bound
constexpr int64_t kMaxBackwardBlocks = 8192;
constexpr int64_t kSharedBytes = 48 * 1024;  // the default dynamic shared memory limit
constexpr int64_t kMaxStagedOffsetBytes = 16 * 1024;

// Dynamic shared memory: [basis as acc_t, G*G (spectrum only)] [offsets, opb*G int32 (if staged)].
template <typename acc_t>
__device__ __forceinline__ const int32_t* stage_table(unsigned char* smem, const int32_t* offsets,
                                                      const double* basis, int G, int64_t opb, bool spectrum,
                                                      bool stage_offsets, const acc_t** basis_out) {
  acc_t* s_basis = reinterpret_cast<acc_t*>(smem);
  const int nb = spectrum ? G * G : 0;
  for (int i = threadIdx.x; i < nb; i += blockDim.x) s_basis[i] = static_cast<acc_t>(basis[i]);
  *basis_out = s_basis;
  if (!stage_offsets) return offsets;
  int32_t* s_offs = reinterpret_cast<int32_t*>(smem + nb * sizeof(acc_t));
  const int64_t no = opb * G;
  for (int64_t i = threadIdx.x; i < no; i += blockDim.x) s_offs[i] = offsets[i];
  return s_offs;
}

template <typename scalar_t, int MAXG, bool SPECTRUM>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const scalar_t* __restrict__ w, const int32_t* __restrict__ offsets,
               const double* __restrict__ inv_stab, const double* __restrict__ basis, int G, int64_t opb,
               int64_t c_in, int64_t stride_out, int64_t stride_in, int64_t n_orbits, bool stage_offsets,
               double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ double scratch[kWarps];
  const acc_t* s_basis = nullptr;
  const int32_t* offs = stage_table<acc_t>(smem, offsets, basis, G, opb, SPECTRUM, stage_offsets, &s_basis);
  __syncthreads();

  acc_t pen = 0, eq = 0;
  acc_t rows[SPECTRUM ? MAXG : 1];
  PK_UNROLL
  for (int r = 0; r < (SPECTRUM ? MAXG : 1); ++r) rows[r] = 0;

  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; id < n_orbits; id += step) {
    const int64_t b = id / opb, o = id - b * opb;
    acc_t f[MAXG];
    load_orbit<MAXG>(w, block_base(b, c_in, stride_out, stride_in), offs + o * G, G, f);
    const acc_t mean = orbit_mean<MAXG>(f, G);
    subtract_mean<MAXG>(f, mean, G);
    const acc_t is = static_cast<acc_t>(inv_stab[o]);
    pen += penalty_part<MAXG>(f, is, G);
    eq += energy_part(mean, is, G);
    if constexpr (SPECTRUM) accumulate_row_energies<MAXG>(s_basis, f, is, G, rows);
  }

  const int width = G + 1;
  double* out = partials + static_cast<int64_t>(blockIdx.x) * width;
  double v = block_sum(static_cast<double>(pen), scratch);
  if (threadIdx.x == 0) out[0] = v;
  v = block_sum(static_cast<double>(eq), scratch);
  if (threadIdx.x == 0) out[1] = v;
  if constexpr (SPECTRUM) {
    PK_UNROLL
    for (int r = 1; r < loop_bound(MAXG, G); ++r) {
      if (r >= G) continue;  // G is the same in every thread, so every thread reaches the same syncs
      v = block_sum(static_cast<double>(rows[r]), scratch);
      if (threadIdx.x == 0) out[1 + r] = v;
    }
  }
}

// Adds the partials rows in a fixed order and writes (penalty, eq_energy, spectrum).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
finalize_kernel(const double* __restrict__ partials, int64_t n_rows, int G, const int64_t* __restrict__ row_irrep,
                int n_irreps, bool spectrum, acc_t* __restrict__ pen_out, acc_t* __restrict__ eq_out,
                acc_t* __restrict__ spec_out) {
  __shared__ double totals[kMaxGroupOrder + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int width = G + 1, used = spectrum ? width : 2;
  for (int c = warp; c < used; c += kWarps) {
    double s = 0;
    for (int64_t r = lane; r < n_rows; r += 32) s += partials[r * width + c];
    s = warp_sum(s);
    if (lane == 0) totals[c] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    *pen_out = static_cast<acc_t>(totals[0]);
    *eq_out = static_cast<acc_t>(totals[1]);
    double spec[kMaxGroupOrder];
    for (int k = 0; k < n_irreps; ++k) spec[k] = 0;
    if (spectrum) {
      spec[0] = totals[1];
      for (int r = 1; r < G; ++r) {
        const int64_t k = row_irrep[r];
        if (k >= 0 && k < n_irreps) spec[k] += totals[1 + r];
      }
    }
    for (int k = 0; k < n_irreps; ++k) spec_out[k] = static_cast<acc_t>(spec[k]);
  }
}

template <typename scalar_t, int MAXG>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out, const int32_t* __restrict__ offsets,
                const at::opmath_type<scalar_t>* __restrict__ grad_pen,
                const at::opmath_type<scalar_t>* __restrict__ grad_eq, int G, int64_t opb, int64_t c_in,
                int64_t stride_out, int64_t stride_in, int64_t n_orbits, bool stage_offsets) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const acc_t* unused = nullptr;
  const int32_t* offs = stage_table<acc_t>(smem, offsets, nullptr, G, opb, false, stage_offsets, &unused);
  __syncthreads();
  const acc_t two_pen = acc_t(2) * *grad_pen, two_eq = acc_t(2) * *grad_eq;

  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; id < n_orbits; id += step) {
    const int64_t b = id / opb, o = id - b * opb;
    write_orbit_gradient<MAXG>(w, out, block_base(b, c_in, stride_out, stride_in), offs + o * G, G, two_pen, two_eq);
  }
}

// Calls fn(std::integral_constant<int, MAXG>) with the smallest instantiated bound >= G.
template <typename Fn>
void dispatch_max_group(int64_t G, Fn&& fn) {
  if (G <= 4) {
    fn(std::integral_constant<int, 4>{});
  } else if (G <= 16) {
    fn(std::integral_constant<int, 16>{});
  } else {
    fn(std::integral_constant<int, kMaxGroupOrder>{});
  }
}

int64_t grid_for(int64_t n_orbits, int64_t cap) {
  return std::max<int64_t>(1, std::min<int64_t>((n_orbits + kThreads - 1) / kThreads, cap));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cuda(
    const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& inv_stab, const at::Tensor& basis,
    const at::Tensor& row_irrep, int64_t n_irreps, int64_t c_out, int64_t c_in, int64_t stride_out,
    int64_t stride_in, bool with_spectrum) {
  constexpr const char* op = "projkernels_C::fused_forward";
  check_weight(weight, op);
  const OrbitArgs t = check_table(weight, offsets, inv_stab, c_out, c_in, stride_out, stride_in, op);
  check_spectral(weight, basis, row_irrep, t.G, n_irreps, op);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(weight.device().index());
  const at::Tensor w = weight.contiguous();
  const at::Tensor basis_c = basis.contiguous(), row_irrep_c = row_irrep.contiguous();
  const auto acc = acc_type_of(w.scalar_type());
  const int G = static_cast<int>(t.G);
  const int64_t n = t.n_orbits(), grid = grid_for(n, kMaxForwardBlocks);

  at::Tensor pen = at::empty({}, w.options().dtype(acc));
  at::Tensor eq = at::empty({}, w.options().dtype(acc));
  at::Tensor spec = at::empty({n_irreps}, w.options().dtype(acc));
  at::Tensor partials = at::empty({grid, G + 1}, w.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fused_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t basis_bytes = with_spectrum ? int64_t(G) * G * sizeof(acc_t) : 0;
    const int64_t offs_bytes = t.orbits_per_block * G * int64_t(sizeof(int32_t));
    const bool stage = offs_bytes <= std::min(kMaxStagedOffsetBytes, kSharedBytes - basis_bytes);
    const size_t smem = static_cast<size_t>(basis_bytes + (stage ? offs_bytes : 0));
    dispatch_max_group(G, [&](auto maxg) {
      constexpr int MAXG = decltype(maxg)::value;
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, smem, stream>>>(
            w.const_data_ptr<scalar_t>(), t.offsets.const_data_ptr<int32_t>(), t.inv_stab.const_data_ptr<double>(),
            basis_c.const_data_ptr<double>(), G, t.orbits_per_block, t.c_in, t.stride_out, t.stride_in, n, stage,
            partials.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (with_spectrum) {
        launch(forward_kernel<scalar_t, MAXG, true>);
      } else {
        launch(forward_kernel<scalar_t, MAXG, false>);
      }
    });
    finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
        partials.const_data_ptr<double>(), grid, G, row_irrep_c.const_data_ptr<int64_t>(),
        static_cast<int>(n_irreps), with_spectrum, pen.mutable_data_ptr<acc_t>(), eq.mutable_data_ptr<acc_t>(),
        spec.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pen, eq, spec};
}

at::Tensor fused_backward_cuda(const at::Tensor& weight, const at::Tensor& grad_penalty, const at::Tensor& grad_eq,
                               const at::Tensor& offsets, const at::Tensor& inv_stab, int64_t c_out, int64_t c_in,
                               int64_t stride_out, int64_t stride_in) {
  constexpr const char* op = "projkernels_C::fused_backward";
  check_weight(weight, op);
  check_grad(weight, grad_penalty, "grad_penalty", op);
  check_grad(weight, grad_eq, "grad_eq", op);
  const OrbitArgs t = check_table(weight, offsets, inv_stab, c_out, c_in, stride_out, stride_in, op);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(weight.device().index());
  const at::Tensor w = weight.contiguous();
  const auto acc = acc_type_of(w.scalar_type());
  // Device-side scalars: reading them in the kernel avoids a host sync.
  const at::Tensor gp = grad_penalty.reshape({}).to(acc), ge = grad_eq.reshape({}).to(acc);
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  const int G = static_cast<int>(t.G);
  const int64_t n = t.n_orbits(), grid = grid_for(n, kMaxBackwardBlocks);
  const int64_t offs_bytes = t.orbits_per_block * G * int64_t(sizeof(int32_t));
  const bool stage = offs_bytes <= kMaxStagedOffsetBytes;
  const size_t smem = stage ? static_cast<size_t>(offs_bytes) : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fused_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_max_group(G, [&](auto maxg) {
      constexpr int MAXG = decltype(maxg)::value;
      backward_kernel<scalar_t, MAXG><<<grid, kThreads, smem, stream>>>(
          w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), t.offsets.const_data_ptr<int32_t>(),
          gp.const_data_ptr<acc_t>(), ge.const_data_ptr<acc_t>(), G, t.orbits_per_block, t.c_in, t.stride_out,
          t.stride_in, n, stage);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
