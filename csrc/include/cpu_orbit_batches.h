// The CPU walk of the finite-group ops: every layer is read in the order it lies in memory, a batch
// of consecutive orbits (whole field blocks where they fit) at a time, and the per-orbit math of
// orbit_math.h runs across the batch's orbits as vector loops.
//
// Why (measured on a 2-core Zen 3): walking one orbit at a time through orbit_math.h's entry points
// is latency-bound, not bandwidth-bound: each orbit is |G| dependent scalar loads, a scalar sum, a
// division and a scalar sum of squares, and the compiler cannot vectorise across orbits, so C4 (4
// values an orbit) ran at 13% of copy bandwidth on one thread.  Here a batch is first gathered from
// the weight into an orbit-major buffer f[g][column] (column = orbit of the batch; the buffer stays
// in L1), and then every step (sum, mean, deviations, squares, the per-orbit results) is a loop over
// columns with unit stride, which the compiler vectorises.  The batch covers consecutive orbits of
// consecutive blocks, so the gather reads the weight's rows front to back.
//
// Values near the dtype's largest finite value: the vector loops compute exactly what orbit_math.h's
// usual path computes, orbit by orbit, in the same order (sum over g in element order, then /|G|,
// then the squares in element order); a column whose sum or result is not finite is computed again
// from a copy of its values by orbit_math.h's own functions, which take their slow paths.  So every
// orbit's values are those of orbit_math.h, bit for bit.
//
// Signed offsets (orbit_math.h, entry_of / negated): a table holding a negative offset runs the
// SIGNED instantiation, which multiplies each gathered value by its sign (+1 or -1, exact) and each
// stored value by the same sign; tables without one run the unsigned instantiation, which has no
// sign array at all.
//
// Determinism: a layer's orbits are cut into chunks whose size depends only on the table (orbits
// per block and |G|), the batches inside a chunk are fixed by the chunk, per-orbit results are
// added into eight double lanes (column c into lane c % 8) and the lanes in order, and chunk partials
// are summed in chunk order by the caller: results are bitwise identical for any thread count.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "decay_math.h"
#include "layer_desc.h"
#include "orbit_math.h"

namespace projkernels {
namespace cpu {

// Orbit entries per task: 64 KiB of float32, so a 20 MiB weight is 320 tasks (enough to balance any
// thread count) and a task's partial sums are a negligible store.
constexpr int64_t kChunkEntries = 16384;
// Orbit entries per batch: the gathered values (and, in the backward, the results) stay in L1.
constexpr int64_t kBatchEntries = 2048;
// Double accumulators of the per-orbit results: independent additions, so the sum is not one long
// dependency chain; their number is part of the summation order.
constexpr int kLanes = 8;

// Orbits per chunk of a layer: a whole number of blocks when a block has at most kChunkEntries
// entries, else a fixed number of orbits.  A function of the table alone.
inline int64_t chunk_orbits(int64_t orbits_per_block, int64_t G) {
  const int64_t block = orbits_per_block * G;
  if (block <= kChunkEntries) return orbits_per_block * (kChunkEntries / block);
  return std::max<int64_t>(1, kChunkEntries / G);
}

// Sets every layer's chunk range (each layer with its own chunk size) and lists the chunks.
inline std::vector<Chunk> plan_chunks(LayerDesc* layers, int64_t n_layers) {
  std::vector<Chunk> chunks;
  for (int64_t l = 0; l < n_layers; ++l) {
    LayerDesc& d = layers[l];
    const int64_t size = chunk_orbits(d.orbits_per_block, d.G);
    d.chunk_begin = static_cast<int64_t>(chunks.size());
    for (int64_t first = 0; first < d.n_orbits; first += size)
      chunks.push_back(Chunk{first, std::min(d.n_orbits, first + size), static_cast<int32_t>(l), 0});
    d.chunk_end = static_cast<int64_t>(chunks.size());
  }
  return chunks;
}

inline bool has_negative_offset(const int32_t* offsets, int64_t count) {
  bool neg = false;
  for (int64_t i = 0; i < count; ++i) neg |= offsets[i] < 0;
  return neg;
}

// A layer's table in the form the batches read it: transposed to [G][orbits per block] so that the
// gather of one element g over a block's orbits reads its offsets with unit stride.
template <typename acc_t>
struct BatchTable {
  std::vector<int32_t> entry;     // [G][opb]: entry_of(offsets[o][g])
  std::vector<acc_t> sign;        // [G][opb]: -1 where the offset is negative, else +1 (signed tables only)
  std::vector<acc_t> inv_stab;    // [opb]; empty for the decay (its mean needs none)
  bool is_signed = false;
};

template <typename acc_t>
BatchTable<acc_t> make_table(const LayerDesc& d, bool with_inv_stab) {
  BatchTable<acc_t> t;
  const int64_t opb = d.orbits_per_block, G = d.G;
  t.is_signed = has_negative_offset(d.offsets, opb * G);
  t.entry.resize(opb * G);
  if (t.is_signed) t.sign.resize(opb * G);
  for (int64_t o = 0; o < opb; ++o)
    for (int64_t g = 0; g < G; ++g) {
      const int32_t v = d.offsets[o * G + g];
      t.entry[g * opb + o] = entry_of(v);
      if (t.is_signed) t.sign[g * opb + o] = negated(v) ? acc_t(-1) : acc_t(1);
    }
  if (with_inv_stab) {
    t.inv_stab.resize(opb);
    for (int64_t o = 0; o < opb; ++o) t.inv_stab[o] = static_cast<acc_t>(d.inv_stab[o]);
  }
  return t;
}

// A run of orbits [o0, o1) of one block (base) that fills columns [col0, col0 + o1 - o0) of a batch.
struct Segment {
  int64_t base;
  int64_t o0, o1, col0;
};

// The per-thread scratch of a batch walk: the gathered values f[g][c] (row pitch nb), per-column
// temporaries, the segments, and a column copy for the slow paths.
template <typename acc_t>
struct Scratch {
  int64_t G = 0;                  // the group order it is sized for
  int64_t nb = 0;                 // columns of a batch
  std::vector<acc_t> f, aux, mean, tmp, inv, col, col2;
  std::vector<Segment> segs;
  std::vector<int32_t> iota;
  Scratch(int64_t G_, bool with_aux) : G(G_) {
    nb = std::max<int64_t>(1, kBatchEntries / G);
    // Rounded up to the lane count, so the lane loops need no tail; the extra columns are never read.
    nb = (nb + kLanes - 1) / kLanes * kLanes;
    f.resize(G * nb);
    if (with_aux) aux.resize(G * nb);
    mean.resize(nb);
    tmp.resize(nb);
    inv.resize(nb);
    col.resize(G);
    col2.resize(G);
    segs.resize(nb);
    iota.resize(G);
    for (int64_t g = 0; g < G; ++g) iota[g] = static_cast<int32_t>(g);
  }
};

// The calling thread's scratch for order G (with or without aux), kept across calls.  Building one
// allocates and zero-fills about ten buffers (12 KiB for C4 in float32), which measured 36% of the
// instructions of a small weight's forward (8x8x3x3, callgrind).  Reuse is safe because every walk
// writes each buffer entry it reads within the same batch (the lane tails are zeroed explicitly), so
// nothing from an earlier call reaches a result.  Never held across a nested call of a walk.
template <typename acc_t>
inline Scratch<acc_t>& thread_scratch(int64_t G, bool with_aux) {
  thread_local std::unique_ptr<Scratch<acc_t>> cached[2];
  std::unique_ptr<Scratch<acc_t>>& s = cached[with_aux ? 1 : 0];
  if (!s || s->G != G) s = std::make_unique<Scratch<acc_t>>(G, with_aux);
  return *s;
}

// Fills the next batch of orbits [*id, last) of layer d into s.segs, advancing the walk; returns the
// number of columns.
template <typename acc_t>
inline int64_t next_batch(const LayerDesc& d, OrbitWalk& it, int64_t& id, int64_t last, Scratch<acc_t>& s,
                          int64_t& n_segs) {
  int64_t n = 0;
  n_segs = 0;
  while (n < s.nb && id < last) {
    const int64_t take = std::min({d.orbits_per_block - it.orbit, last - id, s.nb - n});
    s.segs[n_segs++] = Segment{it.base, it.orbit, it.orbit + take, n};
    n += take;
    id += take;
    it.advance(take);
  }
  return n;
}

// Software prefetch of the blocks [block, block + count) of a layer: each block is `so` runs of
// stride_in entries, one per row of its out-field (launch_plan.h, tiles), and consecutive blocks of
// one out-field continue each other's runs.  Measured: the gather visits a batch's rows one after
// the other in the order of the orbit table, which the hardware prefetcher follows poorly (the
// orbit walk ran at the same speed as the old orbit-at-a-time walk once the weight left L2); issuing
// the next batch's lines while the current one is computed hides that latency.
struct Rows {
  int64_t so = 0;       // rows of a block (0: the layout is not row-structured; no prefetch)
  int64_t row_len = 0;  // entries between two rows of a block
};

inline Rows rows_of(const LayerDesc& d) {
  Rows r;
  const int64_t row_len = d.c_in * d.stride_in;
  if (row_len < 1 || d.stride_out < row_len || d.stride_out % row_len != 0) return r;
  r.so = d.stride_out / row_len;
  r.row_len = row_len;
  return r;
}

template <typename scalar_t>
inline void prefetch_blocks(const scalar_t* w, const LayerDesc& d, const Rows& rows, int64_t block, int64_t count,
                            int64_t n_blocks) {
  if (rows.so == 0 || block >= n_blocks) return;
  count = std::min(count, n_blocks - block);
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t)) > 0 ? 64 / static_cast<int64_t>(sizeof(scalar_t)) : 1;
  int64_t b = block;
  while (b < block + count) {
    // The blocks b .. e - 1 of one out-field: one contiguous run per row.
    const int64_t fo = b / d.c_in, fi = b - fo * d.c_in;
    const int64_t e = std::min(block + count, (fo + 1) * d.c_in);
    const int64_t len = (e - b) * d.stride_in;
    for (int64_t a = 0; a < rows.so; ++a) {
      const scalar_t* p = w + fo * d.stride_out + a * rows.row_len + fi * d.stride_in;
      for (int64_t i = 0; i < len; i += kLine) __builtin_prefetch(p + i, 0, 3);
      __builtin_prefetch(p + len - 1, 0, 3);
    }
    b = e;
  }
}

// dst[g][col0 + o - o0] = sign * src[base + entry[g][o]] for the batch's segments.
template <bool SIGNED, typename scalar_t, typename acc_t>
inline void gather(const scalar_t* __restrict__ src, const BatchTable<acc_t>& t, int G, int64_t opb,
                   const Segment* segs, int64_t n_segs, acc_t* __restrict__ dst, int64_t nb) {
  for (int64_t k = 0; k < n_segs; ++k) {
    const Segment& sg = segs[k];
    const scalar_t* __restrict__ w = src + sg.base;
    for (int g = 0; g < G; ++g) {
      const int32_t* __restrict__ e = t.entry.data() + g * opb;
      acc_t* __restrict__ out = dst + g * nb + sg.col0 - sg.o0;
      if constexpr (SIGNED) {
        const acc_t* __restrict__ sn = t.sign.data() + g * opb;
        for (int64_t o = sg.o0; o < sg.o1; ++o) out[o] = sn[o] * static_cast<acc_t>(w[e[o]]);
      } else {
        for (int64_t o = sg.o0; o < sg.o1; ++o) out[o] = static_cast<acc_t>(w[e[o]]);
      }
    }
  }
}

// dst[base + entry[g][o]] = sign * vals[g][col0 + o - o0], in the dtype of dst.  Within an orbit
// the stores go in element order, so an entry listed twice keeps its last value, as orbit_math.h's
// writers do.
template <bool SIGNED, typename scalar_t, typename acc_t>
inline void scatter(scalar_t* __restrict__ dst, const BatchTable<acc_t>& t, int G, int64_t opb,
                    const Segment* segs, int64_t n_segs, const acc_t* __restrict__ vals, int64_t nb) {
  for (int64_t k = 0; k < n_segs; ++k) {
    const Segment& sg = segs[k];
    scalar_t* __restrict__ w = dst + sg.base;
    for (int g = 0; g < G; ++g) {
      const int32_t* __restrict__ e = t.entry.data() + g * opb;
      const acc_t* __restrict__ in = vals + g * nb + sg.col0 - sg.o0;
      if constexpr (SIGNED) {
        const acc_t* __restrict__ sn = t.sign.data() + g * opb;
        for (int64_t o = sg.o0; o < sg.o1; ++o) w[e[o]] = static_cast<scalar_t>(sn[o] * in[o]);
      } else {
        for (int64_t o = sg.o0; o < sg.o1; ++o) w[e[o]] = static_cast<scalar_t>(in[o]);
      }
    }
  }
}

// inv[col0 + o - o0] = inv_stab[o].
template <typename acc_t>
inline void gather_inv_stab(const BatchTable<acc_t>& t, const Segment* segs, int64_t n_segs, acc_t* inv) {
  for (int64_t k = 0; k < n_segs; ++k)
    for (int64_t o = segs[k].o0; o < segs[k].o1; ++o) inv[segs[k].col0 + o - segs[k].o0] = t.inv_stab[o];
}

// s.col = column c of f.
template <typename acc_t>
inline void copy_column(const acc_t* f, int64_t nb, int G, int64_t c, acc_t* col) {
  for (int g = 0; g < G; ++g) col[g] = f[g * nb + c];
}

// Whether any of v[0, n) is inf or NaN, as an integer OR over the values' exponent bits (all ones
// exactly for inf and NaN; adding the exponent's lowest bit then carries into the sign bit): unlike
// a loop of is_finite tests with an early exit or a bool, this vectorises with plain SSE2.
template <typename acc_t>
inline bool any_nonfinite(const acc_t* __restrict__ v, int64_t n) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  constexpr bits_t exp_mask = sizeof(acc_t) == 8 ? bits_t(0x7ff0000000000000ull) : bits_t(0x7f800000u);
  constexpr bits_t exp_low = sizeof(acc_t) == 8 ? bits_t(0x0010000000000000ull) : bits_t(0x00800000u);
  bits_t acc = 0;
  for (int64_t c = 0; c < n; ++c) {
    bits_t b;
    std::memcpy(&b, v + c, sizeof(b));
    acc |= (b & exp_mask) + exp_low;
  }
  return (acc >> (8 * sizeof(bits_t) - 1)) != 0;
}

// mean[c] of the n columns of f: the sum in element order, / G; a column whose sum is not finite
// takes orbit_mean's slow path on a copy of its values.
template <int K, typename acc_t>
inline void column_means(const acc_t* __restrict__ f, int64_t nb, int Grt, int64_t n, Scratch<acc_t>& s) {
  const int G = order_of(K, Grt);
  acc_t* __restrict__ m = s.mean.data();
  const acc_t gs = static_cast<acc_t>(G);
  if constexpr (K > 0) {
    // A constant |G|: the element loop unrolls inside the column loop, which vectorises, and each
    // column's sum stays in a register.
    for (int64_t c = 0; c < n; ++c) {
      acc_t sum = acc_t(0);
      for (int g = 0; g < K; ++g) sum += f[g * nb + c];
      m[c] = sum / gs;
    }
  } else {
    for (int64_t c = 0; c < n; ++c) m[c] = acc_t(0);
    for (int g = 0; g < G; ++g) {
      const acc_t* __restrict__ fg = f + g * nb;
      for (int64_t c = 0; c < n; ++c) m[c] += fg[c];
    }
    for (int64_t c = 0; c < n; ++c) m[c] = m[c] / gs;
  }
  // sum / G is finite exactly when the sum is.
  const bool bad = any_nonfinite(m, n);
  if (bad) {
    for (int64_t c = 0; c < n; ++c) {
      if (is_finite(m[c])) continue;
      copy_column(f, nb, G, c, s.col.data());
      m[c] = orbit_mean<1>(s.col.data(), G);
    }
  }
}

// lanes[c % kLanes] += v[c] for c < n (n rounded up to kLanes: v holds zeros past n).
template <typename acc_t>
inline void add_lanes(const acc_t* __restrict__ v, int64_t n, double* __restrict__ lanes) {
  for (int64_t c = 0; c < n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(v[c + l]);
}

inline double sum_lanes(const double* lanes) {
  double s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// The penalty and energy of orbits [first, last) of layer d, and with ROWS the row energies
// (rows[r], r = 1..G-1, basis [G][G] in acc_t): out[0] = penalty, out[1] = energy, out[1 + r] = row
// r.  lanes: (G + 1) * kLanes doubles of scratch.
template <int K, bool SIGNED, bool ROWS, typename scalar_t, typename acc_t>
void chunk_forward(const LayerDesc& d, const BatchTable<acc_t>& t, int64_t first, int64_t last, const acc_t* basis,
                   Scratch<acc_t>& s, std::vector<double>& lanes, double* out) {
  const int G = order_of(K, d.G);
  const scalar_t* w = static_cast<const scalar_t*>(d.weight);
  const int64_t nb = s.nb, opb = d.orbits_per_block;
  std::fill(lanes.begin(), lanes.end(), 0.0);
  double* pen_l = lanes.data();
  double* eq_l = lanes.data() + kLanes;
  acc_t* __restrict__ f = s.f.data();
  acc_t* __restrict__ m = s.mean.data();
  acc_t* __restrict__ v = s.tmp.data();
  acc_t* __restrict__ inv = s.inv.data();
  const acc_t gs = static_cast<acc_t>(G);
  OrbitWalk it(first, opb, d.c_in, d.stride_out, d.stride_in);
  // Blocks a batch spans, prefetched one batch ahead (none for blocks larger than a batch, whose
  // long row runs the hardware prefetcher follows).
  const Rows rows = rows_of(d);
  const int64_t n_blocks = d.n_orbits / opb, pf_count = opb <= nb ? nb / opb + 2 : 0;
  for (int64_t id = first; id < last;) {
    int64_t n_segs;
    const int64_t n = next_batch(d, it, id, last, s, n_segs);
    if (pf_count > 0) prefetch_blocks(w, d, rows, it.block, pf_count, n_blocks);
    const int64_t nr = (n + kLanes - 1) / kLanes * kLanes;
    gather<SIGNED>(w, t, G, opb, s.segs.data(), n_segs, f, nb);
    gather_inv_stab(t, s.segs.data(), n_segs, inv);
    for (int64_t c = n; c < nr; ++c) inv[c] = acc_t(0);
    column_means<K>(f, nb, G, n, s);
    for (int64_t c = n; c < nr; ++c) m[c] = acc_t(0);
    // The penalty parts: inv_stab * sum_g (f - mean)^2, in element order.
    for (int64_t c = 0; c < nr; ++c) v[c] = acc_t(0);
    if constexpr (K > 0) {
      for (int64_t c = 0; c < n; ++c) {
        acc_t sq = acc_t(0);
        for (int g = 0; g < K; ++g) {
          const acc_t dv = f[g * nb + c] - m[c];
          sq += dv * dv;
        }
        v[c] = sq;
      }
    } else {
      for (int g = 0; g < G; ++g) {
        const acc_t* __restrict__ fg = f + g * nb;
        for (int64_t c = 0; c < n; ++c) {
          const acc_t dv = fg[c] - m[c];
          v[c] += dv * dv;
        }
      }
    }
    const bool bad = any_nonfinite(v, n);
    for (int64_t c = 0; c < nr; ++c) v[c] = inv[c] * v[c];
    if (bad || ROWS) {
      // Columns whose squares overflowed take penalty_part's slow path; with ROWS every column's row
      // energies are added here (as accumulate_row_energies, or rescaled where the part is not finite).
      for (int64_t c = 0; c < n; ++c) {
        const bool ok = is_finite(v[c]);  // inv_stab in (0, 1]: finite exactly when the sum is
        if (!ROWS && ok) continue;
        copy_column(f, nb, G, c, s.col.data());
        if (!ok) {
          std::copy(s.col.begin(), s.col.end(), s.col2.begin());
          subtract_mean<1>(s.col2.data(), m[c], G);
          v[c] = penalty_part<1>(s.col2.data(), inv[c], G);
        }
        if constexpr (ROWS) {
          double* rl = lanes.data() + 2 * kLanes;
          for (int r = 1; r < G; ++r) {
            const acc_t* br = basis + static_cast<int64_t>(r) * G;
            acc_t e;
            if (is_finite(v[c])) {
              acc_t cf = acc_t(0);
              for (int g = 0; g < G; ++g) cf += br[g] * (s.col[g] - m[c]);
              e = inv[c] * cf * cf;
            } else {
              e = rescaled_row_energy(s.col.data(), 0, s.iota.data(), G, m[c], inv[c], br);
            }
            rl[(r - 1) * kLanes + (c % kLanes)] += static_cast<double>(e);
          }
        }
      }
    }
    add_lanes(v, nr, pen_l);
    // The energy parts: inv_stab * |G| * mean^2, as energy_part.
    for (int64_t c = 0; c < nr; ++c) v[c] = inv[c] * gs * m[c] * m[c];
    add_lanes(v, nr, eq_l);
  }
  out[0] = sum_lanes(pen_l);
  out[1] = sum_lanes(eq_l);
  if constexpr (ROWS)
    for (int r = 1; r < G; ++r) out[1 + r] = sum_lanes(lanes.data() + (1 + r) * kLanes);
}

// dW = 2 grad_pen (W - P W) + 2 grad_eq P W (the projection: 0 and 1/2) on orbits [first, last).
template <int K, bool SIGNED, typename scalar_t, typename acc_t>
void chunk_gradient(const LayerDesc& d, const BatchTable<acc_t>& t, int64_t first, int64_t last, acc_t two_pen,
                    acc_t two_eq, Scratch<acc_t>& s) {
  const int G = order_of(K, d.G);
  const scalar_t* w = static_cast<const scalar_t*>(d.weight);
  scalar_t* out = static_cast<scalar_t*>(d.out);
  const int64_t nb = s.nb, opb = d.orbits_per_block;
  acc_t* __restrict__ f = s.f.data();
  acc_t* __restrict__ r = s.aux.data();
  acc_t* __restrict__ m = s.mean.data();
  OrbitWalk it(first, opb, d.c_in, d.stride_out, d.stride_in);
  // Blocks a batch spans, prefetched one batch ahead (none for blocks larger than a batch, whose
  // long row runs the hardware prefetcher follows).
  const Rows rows = rows_of(d);
  const int64_t n_blocks = d.n_orbits / opb, pf_count = opb <= nb ? nb / opb + 2 : 0;
  for (int64_t id = first; id < last;) {
    int64_t n_segs;
    const int64_t n = next_batch(d, it, id, last, s, n_segs);
    if (pf_count > 0) {
      prefetch_blocks(w, d, rows, it.block, pf_count, n_blocks);
      prefetch_blocks(static_cast<const scalar_t*>(out), d, rows, it.block, pf_count, n_blocks);
    }
    gather<SIGNED>(w, t, G, opb, s.segs.data(), n_segs, f, nb);
    column_means<K>(f, nb, G, n, s);
    bool bad = false;
    for (int g = 0; g < G; ++g) {
      const acc_t* __restrict__ fg = f + g * nb;
      acc_t* __restrict__ rg = r + g * nb;
      // gradient_value without its branch: the deviation term is dropped (not multiplied by 0)
      // when two_pen == 0, so an inf mean gives inf, not NaN.
      if (two_pen == acc_t(0)) {
        for (int64_t c = 0; c < n; ++c) rg[c] = acc_t(0) + two_eq * m[c];
      } else {
        for (int64_t c = 0; c < n; ++c) rg[c] = two_pen * (fg[c] - m[c]) + two_eq * m[c];
      }
      bad |= any_nonfinite(rg, n);
    }
    if (bad) {
      for (int g = 0; g < G; ++g)
        for (int64_t c = 0; c < n; ++c)
          if (!is_finite(r[g * nb + c])) r[g * nb + c] = gradient_at(f[g * nb + c], m[c], two_pen, two_eq);
    }
    scatter<SIGNED>(out, t, G, opb, s.segs.data(), n_segs, r, nb);
  }
}

// The decay (decay_math.h): target <- target + c_dev (W - P W) + c_mean P W on orbits [first, last).
// Every value of a batch is read before any is written, so the in-place step (target == W) reads
// the old W only.  In the signed space of the gather (f = sign * W[entry], old = sign *
// target[entry]) the update is decay_value(old, f, mean), stored times the sign.
template <int K, bool SIGNED, bool IN_PLACE, typename scalar_t, typename acc_t>
void chunk_decay(const LayerDesc& d, const BatchTable<acc_t>& t, int64_t first, int64_t last, Scratch<acc_t>& s) {
  const int G = order_of(K, d.G);
  const scalar_t* w = static_cast<const scalar_t*>(d.weight);
  scalar_t* target = static_cast<scalar_t*>(d.out);
  const acc_t cd = static_cast<acc_t>(d.coef_dev), cm = static_cast<acc_t>(d.coef_mean);
  const int64_t nb = s.nb, opb = d.orbits_per_block;
  acc_t* __restrict__ f = s.f.data();
  acc_t* __restrict__ r = s.aux.data();
  acc_t* __restrict__ m = s.mean.data();
  OrbitWalk it(first, opb, d.c_in, d.stride_out, d.stride_in);
  // Blocks a batch spans, prefetched one batch ahead (none for blocks larger than a batch, whose
  // long row runs the hardware prefetcher follows).
  const Rows rows = rows_of(d);
  const int64_t n_blocks = d.n_orbits / opb, pf_count = opb <= nb ? nb / opb + 2 : 0;
  for (int64_t id = first; id < last;) {
    int64_t n_segs;
    const int64_t n = next_batch(d, it, id, last, s, n_segs);
    if (pf_count > 0) {
      prefetch_blocks(w, d, rows, it.block, pf_count, n_blocks);
      prefetch_blocks(static_cast<const scalar_t*>(target), d, rows, it.block, pf_count, n_blocks);
    }
    gather<SIGNED>(w, t, G, opb, s.segs.data(), n_segs, f, nb);
    if (IN_PLACE) {
      std::copy(f, f + G * nb, r);
    } else {
      gather<SIGNED>(static_cast<const scalar_t*>(target), t, G, opb, s.segs.data(), n_segs, r, nb);
    }
    column_means<K>(f, nb, G, n, s);
    bool bad = false;
    for (int g = 0; g < G; ++g) {
      const acc_t* __restrict__ fg = f + g * nb;
      acc_t* __restrict__ rg = r + g * nb;
      for (int64_t c = 0; c < n; ++c) {
        rg[c] = rg[c] + (cd * (fg[c] - m[c]) + cm * m[c]);
      }
      bad |= any_nonfinite(rg, n);
    }
    if (bad) {
      // Every value again from the old ones (not yet written back): decay_value takes its slow path
      // where needed.
      if (IN_PLACE) {
        std::copy(f, f + G * nb, r);
      } else {
        gather<SIGNED>(static_cast<const scalar_t*>(target), t, G, opb, s.segs.data(), n_segs, r, nb);
      }
      for (int g = 0; g < G; ++g)
        for (int64_t c = 0; c < n; ++c) r[g * nb + c] = decay::decay_value(r[g * nb + c], f[g * nb + c], m[c], cd, cm);
    }
    scatter<SIGNED>(target, t, G, opb, s.segs.data(), n_segs, r, nb);
  }
}

}  // namespace cpu
}  // namespace projkernels
