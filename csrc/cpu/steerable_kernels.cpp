// CPU kernels of the steerable ops of projkernels_C (schemas in ops/schemas.cpp, autograd in
// autograd/autograd.cpp).  The per-block math is steerable_math.h (shared with the CUDA kernels of
// cuda/steerable_kernels.cu), the argument layout steerable_checks.h.
//
//   steerable_penalty_energy(weight, table[], geometry[]) -> (penalty, eq_energy)
//   steerable_penalty_energy_backward(weight, grad_penalty, grad_eq, table[], geometry[])
//       -> 2 grad_penalty (W - P W) + 2 grad_eq P W        (the weight's dtype)
//   steerable_project(weight, table[], geometry[]) -> P W  (the weight's dtype)
//
// penalty and eq_energy are 0-dim in the accumulation dtype (float64 for float64 weights, float32
// otherwise).  The CPU kernels run the tiles of the layout in parallel (at::parallel_for), each
// tile's sums in double, and add the tiles' partials in tile order: the result does not depend on
// the number of threads.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "op_common.h"  // read_scalar
#include "steerable_checks.h"
#include "steerable_math.h"

namespace projkernels {
namespace {

using at::IntArrayRef;
using at::Tensor;
using at::TensorList;

// fn(tile, type, first block, last block) for every tile, tiles in parallel (grain 1: a tile is
// already thousands of elements of work).
template <typename Fn>
void for_each_tile(const SteerArgs& a, Fn&& fn) {
  const int n_types = static_cast<int>(a.types.size());
  at::parallel_for(0, a.n_tiles, 1, [&](int64_t t0, int64_t t1) {
    int ti = steer_type_of_tile(a.desc_host, n_types, t0);
    for (int64_t tile = t0; tile < t1; ++tile) {
      while (ti + 1 < n_types && a.types[ti + 1].tile_begin <= tile) ++ti;
      const SteerTile bl = steer_tile_blocks(a.types[ti], tile);
      fn(tile, a.types[ti], bl.first, bl.last);
    }
  });
}

// --- a tile's blocks as two small matrix products -------------------------------------------------
//
// The CPU kernels compute the blocks of a tile together, so that each row of Q_t (and of Q_t^T)
// read from cache serves all of them:
//   X  [nb, m]  the tile's blocks, gathered (steer_gather) and converted to acc_t
//   C  [nb, r]  = X Q_t:    C_j   = sum over e in increasing order of x_e Q_t[e, j]
//   PX [nb, m]  = C Q_t^T:  (P x)_e = sum over j in increasing order of C_j Q_t[e, j], the order of
//                           steer_projected (the CUDA kernels' per-element form), read from the
//                           layout's Q_t^T so that consecutive e are consecutive in memory
// Every sum starts from zero and takes one multiply-add per term, in the same order whatever the
// tile's size, the block's place in it and the vector width of its columns: each element's bits
// depend on its block alone, so the thread count changes nothing and a layout of one block per tile
// gives the same P W bit for bit.  The multiply-adds are fused (one rounding) where the CPU has FMA.
//
// These loops are CPU-only and x86-specific in their build (function multiversions below), hence
// here rather than in steerable_math.h, whose helpers nvcc compiles too.

// V lanes of T as one GCC vector (V = 1: the scalar itself).
template <typename T, int V>
struct Lanes {
  typedef T type __attribute__((vector_size(V * sizeof(T))));
};
template <typename T>
struct Lanes<T, 1> {
  typedef T type;
};

// An unaligned load (through an out-parameter: a vector return value of a function compiled for the
// baseline target would warn of an ABI change, though these are always inlined).
template <typename Vec, typename T>
__attribute__((always_inline)) inline void load_lanes(Vec& v, const T* p) {
  std::memcpy(&v, p, sizeof v);
}

// out[b, n0 .. n0 + P V) for NB consecutive rows b of a: the NB x P accumulators stay in registers
// over the whole sum over k, and each row segment of mat is loaded once for the NB rows.
template <typename T, int V, int P, int NB>
__attribute__((always_inline)) inline void product_panel(const T* a, int64_t lda, const T* mat, int64_t ldm,
                                                         int64_t K, T* out, int64_t ldo) {
  using Vec = typename Lanes<T, V>::type;
  Vec acc[NB][P];
  for (int b = 0; b < NB; ++b)
    for (int p = 0; p < P; ++p) acc[b][p] = Vec{};
  for (int64_t k = 0; k < K; ++k) {
    Vec row[P];
    for (int p = 0; p < P; ++p) load_lanes(row[p], mat + k * ldm + p * V);
    for (int b = 0; b < NB; ++b) {
      const T abk = a[b * lda + k];
      for (int p = 0; p < P; ++p) acc[b][p] += abk * row[p];
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int p = 0; p < P; ++p) std::memcpy(out + b * ldo + p * V, &acc[b][p], sizeof(Vec));
}

// Columns [n0, n0 + P V), [n0 + P V, ...) while they fit in N, each panel over all nb rows in groups
// of G (then of 4, then 2, then 1) while its rows of mat stay in L1; n0 ends at the first column left.
template <typename T, int V, int P, int G>
__attribute__((always_inline)) inline void product_columns(const T* a, int64_t lda, const T* mat, int64_t ldm,
                                                           int64_t K, int64_t N, int64_t nb, T* out, int64_t ldo,
                                                           int64_t& n0) {
  for (; n0 + P * V <= N; n0 += P * V) {
    int64_t b = 0;
    for (; b + G <= nb; b += G) product_panel<T, V, P, G>(a + b * lda, lda, mat + n0, ldm, K, out + b * ldo + n0, ldo);
    // The G - 1 rows left at most: fours while they last (G can exceed 8), then two, then one.
    for (; b + 4 <= nb; b += 4) product_panel<T, V, P, 4>(a + b * lda, lda, mat + n0, ldm, K, out + b * ldo + n0, ldo);
    if (nb - b >= 2) {
      product_panel<T, V, P, 2>(a + b * lda, lda, mat + n0, ldm, K, out + b * ldo + n0, ldo);
      b += 2;
    }
    if (nb - b >= 1) product_panel<T, V, P, 1>(a + b * lda, lda, mat + n0, ldm, K, out + b * ldo + n0, ldo);
  }
}

// Columns [n0, N) one vector of V lanes wide, then V/2, ..., 1 for the last N mod V.
template <typename T, int V>
__attribute__((always_inline)) inline void product_narrow_columns(const T* a, int64_t lda, const T* mat, int64_t ldm,
                                                                  int64_t K, int64_t N, int64_t nb, T* out,
                                                                  int64_t ldo, int64_t n0) {
  product_columns<T, V, 1, 8>(a, lda, mat, ldm, K, N, nb, out, ldo, n0);
  if constexpr (V > 1) product_narrow_columns<T, V / 2>(a, lda, mat, ldm, K, N, nb, out, ldo, n0);
}

// out[b, n] = sum_k a[b, k] mat[k, n] for b < nb, n < N (row-major, leading dimensions lda, ldm,
// ldo): panels two vectors wide over G rows at a time (2 G accumulators, as many as the target's
// registers hold next to the loads), then one vector wide over 8 rows, then narrower.
template <typename T, int V, int G>
__attribute__((always_inline)) inline void tile_product_lanes(const T* a, int64_t lda, const T* mat, int64_t ldm,
                                                              int64_t K, int64_t N, int64_t nb, T* out, int64_t ldo) {
  int64_t n0 = 0;
  product_columns<T, V, 2, G>(a, lda, mat, ldm, K, N, nb, out, ldo, n0);
  product_narrow_columns<T, V>(a, lda, mat, ldm, K, N, nb, out, ldo, n0);
}

// sum_e (x_e - px_e)^2 over one block: V partial sums (element e into lane e mod V, the last m mod
// V elements into a scalar one), added in lane order.  The residual, never a difference of energies.
template <typename T, int V>
__attribute__((always_inline)) inline T residual_square_sum_lanes(const T* x, const T* px, int64_t m) {
  using Vec = typename Lanes<T, V>::type;
  Vec acc{};
  int64_t e = 0;
  for (; e + V <= m; e += V) {
    Vec xe, pxe;
    load_lanes(xe, x + e);
    load_lanes(pxe, px + e);
    const Vec d = xe - pxe;
    acc += d * d;
  }
  T tail = 0;
  for (; e < m; ++e) {
    const T d = x[e] - px[e];
    tail += d * d;
  }
  T lanes[V];
  std::memcpy(lanes, &acc, sizeof acc);
  T s = 0;
  for (int l = 0; l < V; ++l) s += lanes[l];
  return s + tail;
}

// The hot loops as function multiversions where GCC builds for x86-64 Linux: the extension is
// compiled for baseline x86-64 (SSE2), and these loops are where wider vectors and FMA pay, so each
// is compiled once per target below and the dynamic loader binds the best one the CPU supports
// (an ifunc).  V is one register's worth of lanes on each target, G rows fill its registers.  The
// versions differ in the last bits (a fused multiply-add rounds once; the residual sums have V
// lanes); one machine always binds the same one.  Elsewhere: one version, for the build's own target.
#define PK_STEER_CPU_VERSIONS(ATTR, VF, VD, G)                                                                 \
  ATTR void tile_product(const float* a, int64_t lda, const float* mat, int64_t ldm, int64_t K, int64_t N,    \
                         int64_t nb, float* out, int64_t ldo) {                                               \
    tile_product_lanes<float, VF, G>(a, lda, mat, ldm, K, N, nb, out, ldo);                                      \
  }                                                                                                           \
  ATTR void tile_product(const double* a, int64_t lda, const double* mat, int64_t ldm, int64_t K, int64_t N,  \
                         int64_t nb, double* out, int64_t ldo) {                                              \
    tile_product_lanes<double, VD, G>(a, lda, mat, ldm, K, N, nb, out, ldo);                                     \
  }                                                                                                           \
  ATTR float residual_square_sum(const float* x, const float* px, int64_t m) {                                \
    return residual_square_sum_lanes<float, VF>(x, px, m);                                                    \
  }                                                                                                           \
  ATTR double residual_square_sum(const double* x, const double* px, int64_t m) {                             \
    return residual_square_sum_lanes<double, VD>(x, px, m);                                                   \
  }

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
PK_STEER_CPU_VERSIONS(__attribute__((target("default"))), 4, 2, 6)
PK_STEER_CPU_VERSIONS(__attribute__((target("avx2,fma"))), 8, 4, 6)
PK_STEER_CPU_VERSIONS(__attribute__((target("avx512f,avx512vl,fma"))), 16, 8, 12)
#else
PK_STEER_CPU_VERSIONS(, 4, 2, 6)
#endif
#undef PK_STEER_CPU_VERSIONS

// Scratch of one tile: X and PX [nb, m], C [nb, r].
template <typename acc_t>
struct TileScratch {
  std::vector<acc_t> x, c, px;
  TileScratch(int64_t nb, int64_t m, int64_t r) : x(nb * m), c(std::max<int64_t>(nb * r, 1)), px(nb * m) {}
};

// Gathers blocks [b0, b1) of type t into s.x and forms s.c = X Q_t and s.px = C Q_t^T.
template <typename scalar_t, typename acc_t>
void project_tile(const scalar_t* w, const SteerArgs& a, const int64_t* fields, const acc_t* q_all,
                  const acc_t* qt_all, const SteerType& t, int64_t b0, int64_t b1, TileScratch<acc_t>& s) {
  const int64_t m = t.m(a.S), r = t.rank, nb = b1 - b0;
  for (int64_t b = b0; b < b1; ++b)
    steer_gather(w, steer_block_base(t, fields, b, a.c_in, a.S), t.d_out, t.d_in, a.c_in, a.S,
                 s.x.data() + (b - b0) * m);
  tile_product(s.x.data(), m, q_all + t.q_offset, r, m, r, nb, s.c.data(), r);
  tile_product(s.c.data(), r, qt_all + t.q_offset, m, r, m, nb, s.px.data(), m);
}

template <typename scalar_t>
void forward_cpu_kernel(const Tensor& w, const SteerArgs& a, std::vector<double>& partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const acc_t* q_all = a.q.const_data_ptr<acc_t>();
  const acc_t* qt_all = a.qt.const_data_ptr<acc_t>();
  const int64_t* fields = a.fields.const_data_ptr<int64_t>();
  for_each_tile(a, [&](int64_t tile, const SteerType& t, int64_t b0, int64_t b1) {
    const int64_t m = t.m(a.S), r = t.rank;
    TileScratch<acc_t> s(b1 - b0, m, r);
    project_tile(wp, a, fields, q_all, qt_all, t, b0, b1, s);
    double pen = 0, eq = 0;
    for (int64_t b = 0; b < b1 - b0; ++b) {
      const acc_t* c = s.c.data() + b * r;
      acc_t be = 0;
      for (int64_t j = 0; j < r; ++j) be += c[j] * c[j];
      pen += static_cast<double>(residual_square_sum(s.x.data() + b * m, s.px.data() + b * m, m));
      eq += static_cast<double>(be);
    }
    partials[2 * tile] = pen;
    partials[2 * tile + 1] = eq;
  });
}

template <typename scalar_t>
void write_cpu_kernel(const Tensor& w, const SteerArgs& a, double two_pen_d, double two_eq_d, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t* q_all = a.q.const_data_ptr<acc_t>();
  const acc_t* qt_all = a.qt.const_data_ptr<acc_t>();
  const int64_t* fields = a.fields.const_data_ptr<int64_t>();
  const acc_t two_pen = static_cast<acc_t>(two_pen_d), two_eq = static_cast<acc_t>(two_eq_d);
  for_each_tile(a, [&](int64_t, const SteerType& t, int64_t b0, int64_t b1) {
    const int64_t m = t.m(a.S), r = t.rank;
    TileScratch<acc_t> s(b1 - b0, m, r);
    project_tile(wp, a, fields, q_all, qt_all, t, b0, b1, s);
    const int64_t run = t.d_in * a.S;
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* x = s.x.data() + (b - b0) * m;
      const acc_t* px = s.px.data() + (b - b0) * m;
      scalar_t* dst = op + steer_block_base(t, fields, b, a.c_in, a.S);
      // Every element of W lies in exactly one block: each output element is written once.
      for (int64_t p = 0; p < t.d_out; ++p, dst += a.c_in * a.S)
        for (int64_t k = 0; k < run; ++k)
          dst[k] = static_cast<scalar_t>(steer_write_value(x[p * run + k], px[p * run + k], two_pen, two_eq));
    }
  });
}

std::tuple<Tensor, Tensor> penalty_energy_cpu(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  const SteerArgs a = check_steerable(weight, table, geometry, "projkernels_C::steerable_penalty_energy");
  const Tensor w = weight.contiguous();
  std::vector<double> partials(2 * a.n_tiles, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "steerable_penalty_energy_cpu",
                                  [&] { forward_cpu_kernel<scalar_t>(w, a, partials); });
  double pen = 0, eq = 0;
  for (int64_t t = 0; t < a.n_tiles; ++t) {  // tile order: independent of the thread count
    pen += partials[2 * t];
    eq += partials[2 * t + 1];
  }
  const auto opts = weight.options().dtype(acc_type_of(weight.scalar_type()));
  Tensor p = at::empty({}, opts), e = at::empty({}, opts);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "steerable_penalty_energy_results", [&] {
    *p.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(pen);
    *e.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(eq);
  });
  return {p, e};
}

Tensor write_cpu(const Tensor& weight, const SteerArgs& a, double two_pen, double two_eq) {
  const Tensor w = weight.contiguous();
  Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "steerable_write_cpu",
                                  [&] { write_cpu_kernel<scalar_t>(w, a, two_pen, two_eq, out); });
  return out;
}

Tensor penalty_energy_backward_cpu(const Tensor& weight, const Tensor& grad_penalty, const Tensor& grad_eq,
                                   TensorList table, IntArrayRef geometry) {
  const SteerArgs a = check_steerable_backward(weight, grad_penalty, grad_eq, table, geometry,
                                               "projkernels_C::steerable_penalty_energy_backward");
  // As the finite-group backward: 2 * grad in double, rounded to the accumulation dtype in the kernel.
  return write_cpu(weight, a, 2 * read_scalar(grad_penalty), 2 * read_scalar(grad_eq));
}

Tensor project_cpu(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  const SteerArgs a = check_steerable(weight, table, geometry, "projkernels_C::steerable_project");
  return write_cpu(weight, a, 0.0, 1.0);
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CPU, m) {
  m.impl("steerable_penalty_energy", &projkernels::penalty_energy_cpu);
  m.impl("steerable_penalty_energy_backward", &projkernels::penalty_energy_backward_cpu);
  m.impl("steerable_project", &projkernels::project_cpu);
}
