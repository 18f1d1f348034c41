// Per-block math of the steerable ops (cpu/steerable_kernels.cpp on the CPU, cuda/steerable_kernels.cu
// on the GPU), as __host__ __device__ functions, so the CPU tests run the addressing and the formulas that
// the CUDA kernels use.
//
// A steerable symmetry (projkernels/symmetry/steerable.py) splits the weight [C_out, C_in, S] into blocks
// W[out field, in field]: d_out x d_in x S numbers, flattened to m in (out channel, in channel,
// kernel position) order.  Every block of one type t is projected by the same Q_t (m x r_t,
// orthonormal columns): C = Q_t^T W_b, P W_b = Q_t C.  The penalty is the squared norm of the
// residual W_b - Q_t C, summed element by element (never ||W_b||^2 - ||C||^2).
//
// The layout arrives as one descriptor row of kSteerDescWidth int64 per type (built once per
// device and dtype by projkernels/symmetry/steerable.py, `_native_layout`): its blocks are numbered
// b = (out field index) * n_in + (in field index), cut into tiles of blocks_per_tile consecutive
// blocks, and tile_begin is the global number of the type's first tile.  A tile is the unit of work
// (one CUDA block, one CPU task) and of the fixed-order reduction: partial sums per tile, added in
// tile order, whatever the number of threads.
#pragma once

#include <cstdint>

#include "orbit_math.h"  // PK_HOST_DEVICE

namespace projkernels {

constexpr int kSteerDescWidth = 9;
// geometry = [c_out, c_in, S, descriptor rows...]
constexpr int kSteerGeometryHead = 3;

struct SteerType {
  int64_t d_out, d_in, rank;        // field sizes, r_t
  int64_t n_out, n_in;              // fields of each side
  int64_t q_offset;                 // Q_t's first entry in the concatenated Q ([m, r] row-major)
  int64_t fields_offset;            // out-field channel offsets, then in-field ones, in `fields`
  int64_t blocks_per_tile, tile_begin;

  PK_HOST_DEVICE static SteerType from(const int64_t* row) {
    return {row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8]};
  }
  PK_HOST_DEVICE int64_t n_blocks() const { return n_out * n_in; }
  PK_HOST_DEVICE int64_t m(int64_t S) const { return d_out * d_in * S; }
  // Blocks in the type's largest tile (fewer than blocks_per_tile when the type has fewer blocks).
  PK_HOST_DEVICE int64_t tile_blocks() const { return blocks_per_tile < n_blocks() ? blocks_per_tile : n_blocks(); }
  PK_HOST_DEVICE int64_t n_tiles() const { return (n_blocks() + blocks_per_tile - 1) / blocks_per_tile; }
};

// The type that owns global tile `tile`: the last one whose tile_begin is <= tile (types are few,
// a handful to a few dozen, so a linear scan).
PK_HOST_DEVICE inline int steer_type_of_tile(const int64_t* desc, int n_types, int64_t tile) {
  int t = 0;
  while (t + 1 < n_types && desc[(t + 1) * kSteerDescWidth + 8] <= tile) ++t;
  return t;
}

// Blocks [first, last) of a type that tile `tile` covers.
struct SteerTile {
  int64_t first, last;
};

PK_HOST_DEVICE inline SteerTile steer_tile_blocks(const SteerType& t, int64_t tile) {
  const int64_t first = (tile - t.tile_begin) * t.blocks_per_tile;
  const int64_t end = first + t.blocks_per_tile;
  return {first, end < t.n_blocks() ? end : t.n_blocks()};
}

// Offset in W ([C_out, C_in, S], row-major) of the first element of block b of type t.  I is the
// block index type: int64_t on the CPU, int in the CUDA kernels (32-bit division; the launch checks
// that a type's blocks number below 2^31).
template <typename I>
PK_HOST_DEVICE inline int64_t steer_block_base(const SteerType& t, const int64_t* fields, I b, int64_t c_in,
                                               int64_t S) {
  const I n_in = static_cast<I>(t.n_in), bo = b / n_in;
  const int64_t o = fields[t.fields_offset + bo];
  const int64_t i = fields[t.fields_offset + t.n_out + (b - bo * n_in)];
  return (o * c_in + i) * S;
}

// Offset of element e of a block (e in (out channel, in channel, kernel position) order) from the
// block's first element.  A block is d_out rows of run = d_in * S elements that are consecutive in
// W, one row per out channel, rows row_stride = c_in * S apart: one 32-bit division per element
// (e < m < 2^31, checked at launch) where the (p, q, k) form takes four 64-bit ones.
PK_HOST_DEVICE inline int64_t steer_elem_offset(int e, int run, int64_t row_stride) {
  const int p = e / run;
  return p * row_stride + (e - p * run);
}

// (P X)_e = sum_j C_j Q_t[e, j], j in increasing order, read from Q_t^T ([r, m] row-major): qt_e
// points at its column e, entry j at qt_e[j * m], so that threads on consecutive e read consecutive
// addresses (coalesced in global memory, distinct banks in shared memory, whatever r).
template <typename acc_t>
PK_HOST_DEVICE inline acc_t steer_projected(const acc_t* c, const acc_t* qt_e, int m, int r) {
  acc_t px = 0;
  for (int j = 0; j < r; ++j) px += c[j] * qt_e[static_cast<int64_t>(j) * m];
  return px;
}

// The write ops' value at one element: 2 g_pen (x - P x) + 2 g_eq P x, with two_pen = 2 g_pen and
// two_eq = 2 g_eq (the gradient of g_pen ||W - P W||^2 + g_eq ||P W||^2; P W itself is
// two_pen = 0, two_eq = 1).
template <typename acc_t>
PK_HOST_DEVICE inline acc_t steer_write_value(acc_t x, acc_t px, acc_t two_pen, acc_t two_eq) {
  return two_pen * (x - px) + two_eq * px;
}

// One block gathered into x[0 .. m) (converted to acc_t), walking its d_out rows of d_in * S
// contiguous elements without divisions.  For one thread per block (the CPU kernels, which then
// form C and P X for all of a tile's blocks at once: cpu/steerable_kernels.cpp, with the same sums in the
// same order as steer_projected).
template <typename scalar_t, typename acc_t>
PK_HOST_DEVICE inline void steer_gather(const scalar_t* w, int64_t base, int64_t d_out, int64_t d_in, int64_t c_in,
                                        int64_t S, acc_t* x) {
  const int64_t run = d_in * S;  // one out channel's in channels are consecutive in W
  for (int64_t p = 0; p < d_out; ++p) {
    const scalar_t* src = w + base + p * c_in * S;
    for (int64_t e = 0; e < run; ++e) x[p * run + e] = static_cast<acc_t>(src[e]);
  }
}

// Where the CUDA kernels (steerable_kernels.cu) keep a tile's operands.  The dynamic shared memory
// of a block, shared_elems numbers of the accumulation dtype, is handed out in this order:
//   c  the coefficients C [tile_blocks, r]: read by every element of the tile;
//   q  Q_t^T [r, m]: read r times per element, once in each phase;
//   x  the tile's blocks X [tile_blocks, m] in acc_t: read r times per element by the
//      coefficient phase, which then gathers from W only once.
// Each goes to shared memory when it fits next to the ones before it.  Q_t^T and X otherwise come
// from global memory (Q_t^T coalesced, and one copy per type that L1/L2 serve to all its tiles);
// coefficients that do not fit (a single block of rank above the budget) go to a global scratch
// buffer that the op allocates (steer_scratch_offset).  The host sizes the launch and the buffer
// with these functions and every CUDA block applies them to its own type, so both agree.
struct SteerStaging {
  bool c_shared;
  int64_t c, q, x;  // numbers of each in shared memory, 0 where global (C, Q_t^T, X in that order)
  PK_HOST_DEVICE int64_t elems() const { return c + q + x; }
};

PK_HOST_DEVICE inline SteerStaging steer_staging(const SteerType& t, int64_t S, int64_t shared_elems) {
  const int64_t nb = t.tile_blocks(), m = t.m(S), c = nb * t.rank, q = m * t.rank, x = nb * m;
  SteerStaging s{c <= shared_elems, 0, 0, 0};
  if (s.c_shared) s.c = c;
  if (s.c + q <= shared_elems) s.q = q;
  if (s.c + s.q + x <= shared_elems) s.x = x;
  return s;
}

// The global scratch index of the first coefficient of type `type` (n_blocks * rank numbers per type
// whose coefficients are not in shared memory, in type order); with type = the number of types, the
// scratch buffer's size.
PK_HOST_DEVICE inline int64_t steer_scratch_offset(const int64_t* desc, int type, int64_t S, int64_t shared_elems) {
  int64_t off = 0;
  for (int u = 0; u < type; ++u) {
    const SteerType t = SteerType::from(desc + static_cast<int64_t>(u) * kSteerDescWidth);
    if (!steer_staging(t, S, shared_elems).c_shared) off += t.n_blocks() * t.rank;
  }
  return off;
}

}  // namespace projkernels
