// Per-orbit math shared by the CPU and CUDA kernels (and the C++ unit tests).
//
// An orbit is described by |G| flat offsets (one per group element, in element order) into a
// contiguous weight; an entry whose stabiliser is non-trivial appears |Stab| times, and
// inv_stab = 1/|Stab| = |O|/|G| undoes that repetition.  With f[g] = W[base + offsets[g]] (for a
// signed offset, f[g] = -W[base + ~offsets[g]]; see entry_of below):
//
//   mean          = sum_g f[g] / |G|
//   dev[g]        = f[g] - mean
//   penalty part  = inv_stab * sum_g dev[g]^2           (never ||W||^2 - ||P W||^2: that cancels)
//   energy part   = inv_stab * |G| * mean^2
//   row energy r  = inv_stab * (basis[r] . dev)^2        (r >= 1; the irrep of row r owns it)
//   dW[g]         = 2 g_pen dev[g] + 2 g_eq mean
//
// Kernels name the group order by a compile-time class K (static_switch.h picks it):
//   K > 0   |G| == K exactly (the common orders 1, 2, 4, 8, 16): loops have constant bounds;
//   K < 0   |G| <= -K at run time: the orbit is held in an array of -K values;
//   K == 0  any |G|: no per-orbit array, the orbit is streamed from memory (read twice, and once
//           more per basis row for the spectrum), so no order is too large for a kernel.
// Arrays of bound up to kMaxUnrolled are unrolled completely on CUDA, with every index a
// compile-time constant, so the orbit stays in registers (PK_UNROLL).  Plain C++ sees none of the
// CUDA qualifiers, so this header builds without torch and without nvcc.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PK_HOST_DEVICE __host__ __device__
// Bounds up to kMaxUnrolled are unrolled completely; larger bounds loop to the runtime |G| (the
// orbit goes to local memory), which keeps compile time and code size sane for the rare large groups.
#define PK_UNROLL _Pragma("unroll (projkernels::unrolled(MAXG) ? MAXG : 1)")
// A loop over the orbits of a batch (a compile-time count): unrolled, so each orbit's values stay
// in registers.
#define PK_UNROLL_BATCH _Pragma("unroll")
#else
#define PK_HOST_DEVICE
#define PK_UNROLL
#define PK_UNROLL_BATCH
#endif

namespace projkernels {

// The largest group order the ops accept.  The streamed class (K == 0) has no per-order limit;
// this bound only keeps |G|^2 (the basis size) and row * |G| indices inside int32.  The Python side
// refuses much smaller orders first, when the group's own tables would not fit in memory.
constexpr int kMaxGroupOrder = 1 << 15;
// Orders up to this bound keep the orbit in a per-thread array (K != 0); larger ones are streamed.
constexpr int kMaxArrayOrder = 64;
constexpr int kMaxUnrolled = 16;

// The array bound of class K (1 for the streamed class, which has no array) and the group order a
// kernel of class K works with (the constant itself when K > 0, so its loops have constant bounds).
PK_HOST_DEVICE constexpr int array_bound(int K) { return K > 0 ? K : (K < 0 ? -K : 1); }
PK_HOST_DEVICE constexpr int order_of(int K, int G) { return K > 0 ? K : G; }

PK_HOST_DEVICE constexpr bool unrolled(int maxg) { return maxg <= kMaxUnrolled; }

// Loops run to MAXG when unrolled (skipping g >= G by a predicate: an early exit would defeat
// the register promotion) and to G otherwise.
PK_HOST_DEVICE constexpr int loop_bound(int maxg, int G) {
#if defined(__CUDA_ARCH__)
  return unrolled(maxg) ? maxg : G;
#else
  // Host code has no register arrays to protect: loop to G (a constant for the exact classes).
  return static_cast<void>(maxg), G;
#endif
}

// Signed orbit offsets.  A field whose rho(g) are signed permutations (a vector field under quarter
// turns: (u, v) -> (-v, u)) maps an entry onto minus another, so an orbit entry carries a sign: an
// offset o >= 0 reads +W[base + o], an offset o < 0 reads -W[base + ~o] (~o = -o - 1 keeps offset 0
// negatable).  Tables of trivial and regular fields hold no negative offset.
PK_HOST_DEVICE constexpr int32_t entry_of(int32_t o) { return o < 0 ? ~o : o; }
PK_HOST_DEVICE constexpr bool negated(int32_t o) { return o < 0; }

// The compile-time switch between the two encodings is the offsets' element type: the helpers below
// take `const off_t* offsets` with off_t deduced, int32_t for the tables without a negative offset
// (the code of the unsigned path is exactly what it is without signs) and SignedOffset, the same 32
// bits, for the tables whose flag says they hold one (SIGNED_SWITCH, static_switch.h).  Values are
// read as f = s W[entry] and written as s v (v = dW or P(W) in f's terms), so the orbit math between
// loads and stores is the same for both.
struct SignedOffset {
  int32_t o;
};
static_assert(sizeof(SignedOffset) == sizeof(int32_t), "a signed table is read in place as SignedOffset");

PK_HOST_DEVICE inline int32_t entry_index(int32_t o) { return o; }
PK_HOST_DEVICE inline int32_t entry_index(SignedOffset o) { return entry_of(o.o); }
template <typename acc_t>
PK_HOST_DEVICE inline acc_t apply_sign(int32_t, acc_t v) { return v; }
template <typename acc_t>
PK_HOST_DEVICE inline acc_t apply_sign(SignedOffset o, acc_t v) { return negated(o.o) ? -v : v; }

// s W[base + entry] in the accumulation type.
template <typename acc_t, typename scalar_t, typename off_t>
PK_HOST_DEVICE inline acc_t load_entry(const scalar_t* __restrict__ w, int64_t base, off_t o) {
  return apply_sign(o, static_cast<acc_t>(w[base + entry_index(o)]));
}

// out[base + entry] = s v, rounded once to the weight's dtype (the sign is exact).
template <typename scalar_t, typename acc_t, typename off_t>
PK_HOST_DEVICE inline void store_entry(scalar_t* out, int64_t base, off_t o, acc_t v) {
  out[base + entry_index(o)] = static_cast<scalar_t>(apply_sign(o, v));
}

// Offsets are relative to a block's first entry; block b = (out-field, in-field) in row-major order
// starts here in the contiguous weight.
PK_HOST_DEVICE inline int64_t block_base(int64_t b, int64_t c_in, int64_t stride_out, int64_t stride_in) {
  return (b / c_in) * stride_out + (b % c_in) * stride_in;
}

// Walks orbit ids id, id + step, ... keeping (block, orbit within block, block base) up to date with
// a division only when the walk leaves a block: a CPU task walking a chunk (step 1) would otherwise
// pay two 64-bit divisions per orbit, which costs more than the orbit's loads.
struct OrbitWalk {
  int64_t block, orbit, base;
  int64_t opb, c_in, stride_out, stride_in;

  PK_HOST_DEVICE OrbitWalk(int64_t id, int64_t opb_, int64_t c_in_, int64_t stride_out_, int64_t stride_in_)
      : block(id / opb_), orbit(id % opb_), base(0), opb(opb_), c_in(c_in_), stride_out(stride_out_),
        stride_in(stride_in_) {
    base = block_base(block, c_in, stride_out, stride_in);
  }

  PK_HOST_DEVICE void advance(int64_t step) {
    orbit += step;
    if (orbit >= opb) {
      const int64_t carry = orbit / opb;
      block += carry;
      orbit -= carry * opb;
      base = block_base(block, c_in, stride_out, stride_in);
    }
  }
};

// f[g] = s W[base + entry] (orbit_math's f) converted to the accumulation type.
template <int MAXG, typename scalar_t, typename acc_t, typename off_t>
PK_HOST_DEVICE inline void load_orbit(const scalar_t* __restrict__ w, int64_t base,
                                      const off_t* __restrict__ offsets, int G, acc_t* f) {
  PK_UNROLL
  for (int g = 0; g < loop_bound(MAXG, G); ++g) {
    if (g >= G) continue;
    f[g] = load_entry<acc_t>(w, base, offsets[g]);
  }
}

// --- values near the dtype's largest finite value ---------------------------------------------
//
// The orbit sum of values near the largest finite value overflows although the mean does not (an
// equivariant float32 weight of 1e38: sum 4e38 = inf, so P W = inf, and dev = inf - inf = NaN).  The
// usual path stays as it is; only a result that is not finite is computed again on the values scaled
// by kDown = 2^-16 (2^16 >= kMaxGroupOrder, so the scaled sum of any orbit is finite) and scaled
// back by kUp.  Scaling by a power of two is exact (the values small enough to lose bits are far
// below the rounding of the large ones), so finite results keep their bits, and results whose true
// value is finite are no longer inf or NaN; those whose true value exceeds the dtype's range
// (||W||^2 of such a weight) stay inf.  A non-finite input still gives a non-finite result.

// x is neither inf nor NaN: x - x is exactly 0 then, NaN otherwise (no <cmath>: host and device alike).
template <typename acc_t>
PK_HOST_DEVICE inline bool is_finite(acc_t x) { return x - x == acc_t(0); }

constexpr double kDown = 1.0 / 65536.0;
constexpr double kUp = 65536.0;
static_assert(kMaxGroupOrder <= 65536, "the scaled orbit sum needs 2^16 >= |G|");

// The mean from the sum of the scaled values, clamped to [lo, hi], the least and largest value
// (the rounded sum of values at the largest finite value could otherwise round the mean past it).
template <typename acc_t>
PK_HOST_DEVICE inline acc_t clamped_mean(acc_t scaled_sum, int G, acc_t lo, acc_t hi) {
  const acc_t m = scaled_sum / static_cast<acc_t>(G) * static_cast<acc_t>(kUp);
  return m < lo ? lo : (m > hi ? hi : m);
}

template <int MAXG, typename acc_t>
PK_HOST_DEVICE inline acc_t orbit_mean(const acc_t* f, int G) {
  acc_t s = acc_t(0);
  PK_UNROLL
  for (int g = 0; g < loop_bound(MAXG, G); ++g) {
    if (g >= G) continue;
    s += f[g];
  }
  if (is_finite(s)) return s / static_cast<acc_t>(G);
  // The slow path unrolled like the loop above (constant indices: the orbit stays in registers).
  acc_t t = acc_t(0), lo = f[0], hi = f[0];
  PK_UNROLL
  for (int g = 0; g < loop_bound(MAXG, G); ++g) {
    if (g >= G) continue;
    t += f[g] * static_cast<acc_t>(kDown);
    lo = f[g] < lo ? f[g] : lo;
    hi = f[g] > hi ? f[g] : hi;
  }
  return clamped_mean(t, G, lo, hi);
}

// In place: f becomes the deviations from the orbit mean.
template <int MAXG, typename acc_t>
PK_HOST_DEVICE inline void subtract_mean(acc_t* f, acc_t mean, int G) {
  PK_UNROLL
  for (int g = 0; g < loop_bound(MAXG, G); ++g) {
    if (g >= G) continue;
    f[g] -= mean;
  }
}

template <int MAXG, typename acc_t>
PK_HOST_DEVICE inline acc_t sum_squares(const acc_t* dev, int G) {
  acc_t s = acc_t(0);
  PK_UNROLL
  for (int g = 0; g < loop_bound(MAXG, G); ++g) {
    if (g >= G) continue;
    s += dev[g] * dev[g];
  }
  return s;
}

// inv_stab * sum_g dev[g]^2 where that sum overflowed (a repeated entry counts |Stab| times in the
// sum, so the part itself can be finite): on scaled deviations, scaled back after inv_stab.
template <int MAXG, typename acc_t>
PK_HOST_DEVICE inline acc_t penalty_part(const acc_t* dev, acc_t inv_stab, int G) {
  const acc_t s = sum_squares<MAXG>(dev, G);
  if (is_finite(s)) return inv_stab * s;
  // Unrolled like sum_squares.  A deviation that overflowed (inf) gives inf, rightly: its square
  // alone exceeds the range.
  acc_t t = acc_t(0);
  PK_UNROLL
  for (int g = 0; g < loop_bound(MAXG, G); ++g) {
    if (g >= G) continue;
    const acc_t d = dev[g] * static_cast<acc_t>(kDown);
    t += d * d;
  }
  return inv_stab * t * static_cast<acc_t>(kUp) * static_cast<acc_t>(kUp);
}

template <typename acc_t>
PK_HOST_DEVICE inline acc_t energy_part(acc_t mean, acc_t inv_stab, int G) {
  return inv_stab * static_cast<acc_t>(G) * mean * mean;
}

// basis_row . dev for one row of the isotypic basis.
template <int MAXG, typename acc_t, typename basis_t>
PK_HOST_DEVICE inline acc_t row_coefficient(const basis_t* basis_row, const acc_t* dev, int G) {
  acc_t c = acc_t(0);
  PK_UNROLL
  for (int g = 0; g < loop_bound(MAXG, G); ++g) {
    if (g >= G) continue;
    c += static_cast<acc_t>(basis_row[g]) * dev[g];
  }
  return c;
}

// row_energy[r] += inv_stab * (basis[r] . dev)^2 for the non-trivial rows r = 1..G-1 (row 0 is the
// constant row, orthogonal to dev; its energy is the energy part above).  basis is row-major [G, G].
template <int MAXG, typename acc_t, typename basis_t>
PK_HOST_DEVICE inline void accumulate_row_energies(const basis_t* basis, const acc_t* dev, acc_t inv_stab,
                                                   int G, acc_t* row_energy) {
  PK_UNROLL
  for (int r = 1; r < loop_bound(MAXG, G); ++r) {
    if (r >= G) continue;
    const acc_t c = row_coefficient<MAXG>(basis + r * G, dev, G);
    row_energy[r] += inv_stab * c * c;
  }
}

// Per-irrep energies from per-row energies: spectrum[0] = energy (the trivial irrep), and every
// other row adds to its irrep's entry.  spectrum must hold n_irreps zeros on entry.
template <typename acc_t, typename out_t>
PK_HOST_DEVICE inline void rows_to_irreps(const acc_t* row_energy, acc_t energy, const int64_t* row_irrep,
                                          int G, out_t* spectrum) {
  spectrum[0] += static_cast<out_t>(energy);
  for (int r = 1; r < G; ++r) spectrum[row_irrep[r]] += static_cast<out_t>(row_energy[r]);
}

// The value of dW (and, with grad_pen = 0, grad_eq = 1/2, of P(W)) at orbit entry g.  With
// two_grad_pen == 0 the deviation term is dropped, not multiplied: in an orbit holding an inf the
// deviation is inf - inf = NaN, and 0 * NaN would turn the projection's inf (the mean) into NaN.
// In float16 the value itself can overflow to inf where |2 g_pen dev + 2 g_eq mean| > 65504: it is
// computed in float32 and rounded to the weight's dtype once, when it is stored.
template <typename acc_t>
PK_HOST_DEVICE inline acc_t gradient_value(acc_t dev_g, acc_t mean, acc_t two_grad_pen, acc_t two_grad_eq) {
  const acc_t pen_term = two_grad_pen == acc_t(0) ? acc_t(0) : two_grad_pen * dev_g;
  return pen_term + two_grad_eq * mean;
}

// gradient_value at an entry of value f_g: f_g - mean overflows where the two are near the largest
// finite value with opposite signs, and the terms can overflow where their sum does not; then the
// same terms on scaled values, scaled back.
template <typename acc_t>
PK_HOST_DEVICE inline acc_t gradient_at(acc_t f_g, acc_t mean, acc_t two_grad_pen, acc_t two_grad_eq) {
  const acc_t v = gradient_value(f_g - mean, mean, two_grad_pen, two_grad_eq);
  if (is_finite(v)) return v;
  const acc_t down = static_cast<acc_t>(kDown), m = mean * down;
  return gradient_value(f_g * down - m, m, two_grad_pen, two_grad_eq) * static_cast<acc_t>(kUp);
}

// --- the streamed class (K == 0): no per-orbit array ------------------------------------------

template <typename acc_t, typename scalar_t, typename off_t>
PK_HOST_DEVICE inline acc_t streamed_mean(const scalar_t* __restrict__ w, int64_t base,
                                          const off_t* __restrict__ offsets, int G) {
  acc_t s = acc_t(0);
  for (int g = 0; g < G; ++g) s += load_entry<acc_t>(w, base, offsets[g]);
  if (is_finite(s)) return s / static_cast<acc_t>(G);
  acc_t t = acc_t(0), lo = load_entry<acc_t>(w, base, offsets[0]), hi = lo;
  for (int g = 0; g < G; ++g) {
    const acc_t v = load_entry<acc_t>(w, base, offsets[g]);
    t += v * static_cast<acc_t>(kDown);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  return clamped_mean(t, G, lo, hi);
}

template <typename acc_t, typename scalar_t, typename off_t>
PK_HOST_DEVICE inline acc_t streamed_sum_squares(const scalar_t* __restrict__ w, int64_t base,
                                                 const off_t* __restrict__ offsets, int G, acc_t mean) {
  acc_t s = acc_t(0);
  for (int g = 0; g < G; ++g) {
    const acc_t d = load_entry<acc_t>(w, base, offsets[g]) - mean;
    s += d * d;
  }
  return s;
}

// The penalty part of a streamed orbit: inv_stab * the sum above, or where that sum is not finite,
// the sum of the scaled deviations (each taken on scaled values: f - mean itself can overflow).
template <typename acc_t, typename scalar_t, typename off_t>
PK_HOST_DEVICE inline acc_t streamed_penalty_part(const scalar_t* __restrict__ w, int64_t base,
                                                  const off_t* __restrict__ offsets, int G, acc_t mean,
                                                  acc_t inv_stab) {
  const acc_t s = streamed_sum_squares(w, base, offsets, G, mean);
  if (is_finite(s)) return inv_stab * s;
  const acc_t down = static_cast<acc_t>(kDown), m = mean * down;
  acc_t t = acc_t(0);
  for (int g = 0; g < G; ++g) {
    const acc_t d = load_entry<acc_t>(w, base, offsets[g]) * down - m;  // never inf - inf
    t += d * d;
  }
  return inv_stab * t * static_cast<acc_t>(kUp) * static_cast<acc_t>(kUp);
}

template <typename acc_t, typename scalar_t, typename basis_t, typename off_t>
PK_HOST_DEVICE inline acc_t streamed_row_coefficient(const scalar_t* __restrict__ w, int64_t base,
                                                     const off_t* __restrict__ offsets, int G, acc_t mean,
                                                     const basis_t* basis_row) {
  acc_t c = acc_t(0);
  for (int g = 0; g < G; ++g) c += static_cast<acc_t>(basis_row[g]) * (load_entry<acc_t>(w, base, offsets[g]) - mean);
  return c;
}

// inv_stab * (basis_row . dev)^2 where the deviations (or the coefficient's partial sums)
// overflowed: the coefficient on scaled values (f * kDown - mean * kDown, never inf - inf), scaled back.
template <typename acc_t, typename scalar_t, typename basis_t, typename off_t>
PK_HOST_DEVICE inline acc_t rescaled_row_energy(const scalar_t* __restrict__ w, int64_t base,
                                                const off_t* __restrict__ offsets, int G, acc_t mean,
                                                acc_t inv_stab, const basis_t* basis_row) {
  const acc_t down = static_cast<acc_t>(kDown), m = mean * down;
  acc_t c = acc_t(0);
  for (int g = 0; g < G; ++g) c += static_cast<acc_t>(basis_row[g]) * (load_entry<acc_t>(w, base, offsets[g]) * down - m);
  return inv_stab * c * c * static_cast<acc_t>(kUp) * static_cast<acc_t>(kUp);
}

// row_energy[r] += the row energies r = 1..G-1 of an orbit whose penalty part is not finite.
template <typename acc_t, typename scalar_t, typename basis_t, typename off_t>
PK_HOST_DEVICE inline void rescaled_row_energies(const scalar_t* __restrict__ w, int64_t base,
                                                 const off_t* __restrict__ offsets, int G, acc_t mean,
                                                 acc_t inv_stab, const basis_t* basis, acc_t* row_energy) {
  for (int r = 1; r < G; ++r)
    row_energy[r] += rescaled_row_energy(w, base, offsets, G, mean, inv_stab, basis + static_cast<int64_t>(r) * G);
}

// --- one orbit, any class: the entry points every kernel calls -----------------------------------

template <typename acc_t>
struct OrbitEnergy {
  acc_t pen;  // penalty part
  acc_t eq;   // energy part
};

// The penalty and energy parts of one orbit of an array class from its loaded values f (centred in
// place); with ROWS, also row_energy[r] += the row energies r = 1..G-1.
// With ROWS, (w, base, offsets) is where f was loaded from: an orbit whose penalty part is not
// finite (a deviation overflowed, which makes basis . dev inf - inf) takes its row energies from
// there, on scaled values.
template <int MAXG, bool ROWS, typename acc_t, typename basis_t = acc_t, typename scalar_t = acc_t,
          typename off_t = int32_t>
PK_HOST_DEVICE inline OrbitEnergy<acc_t> loaded_orbit_energy(acc_t* f, int G, acc_t inv_stab,
                                                             const basis_t* basis = nullptr,
                                                             acc_t* row_energy = nullptr,
                                                             const scalar_t* __restrict__ w = nullptr, int64_t base = 0,
                                                             const off_t* __restrict__ offsets = nullptr) {
  const acc_t mean = orbit_mean<MAXG>(f, G);
  subtract_mean<MAXG>(f, mean, G);
  const acc_t pen = penalty_part<MAXG>(f, inv_stab, G);
  if constexpr (ROWS) {
    if (is_finite(pen)) {
      accumulate_row_energies<MAXG>(basis, f, inv_stab, G, row_energy);
    } else {
      rescaled_row_energies(w, base, offsets, G, mean, inv_stab, basis, row_energy);
    }
  }
  return {pen, energy_part(mean, inv_stab, G)};
}

// Orbits whose loads a thread issues together, before it uses any, in the CUDA chunk walks of the
// exact classes when batching is on (PROJKERNELS_ORBIT_BATCH=1, cuda_launch.cuh): `values` entries,
// 16 in the forward, so a thread keeps 64 bytes of float32 weights in flight (32 of bfloat16) where
// one orbit of C4 keeps 16 (8), and 8 in the backward (the multi-tensor backward runs under a
// register cap, and 16 spilled there).  So the forward batches orders 1 to 8, the backward 1 to 4.  The reasoning: a GPU needs tens of KiB of loads in flight per SM to reach its
// memory bandwidth, a thread's scattered orbit loads are its only source of them, and the chunked
// kernels measured at 41% (float32) and 22% (bfloat16) of copy bandwidth, in the ratio of the bytes
// one orbit's loads bring.  The cost: registers (C4 float32 forward: 32 to 62, so half the
// threads per SM).  Summation order is unchanged: the orbits are still added one by one in walk
// order.
PK_HOST_DEVICE constexpr int batch_orbits(int K, int values = 16) {
  return K <= 0 ? 1 : (values / K < 1 ? 1 : (values / K > 8 ? 8 : values / K));
}

// The penalty and energy parts of one orbit; with ROWS, also row_energy[r] += the row energies
// r = 1..G-1 (basis row-major [G, G], row_energy holding G values).
template <int K, bool ROWS, typename scalar_t, typename acc_t, typename basis_t = acc_t, typename off_t = int32_t>
PK_HOST_DEVICE inline OrbitEnergy<acc_t> orbit_energy(const scalar_t* __restrict__ w, int64_t base,
                                                      const off_t* __restrict__ offsets, int G, acc_t inv_stab,
                                                      const basis_t* basis = nullptr, acc_t* row_energy = nullptr) {
  if constexpr (K == 0) {
    const acc_t mean = streamed_mean<acc_t>(w, base, offsets, G);
    const acc_t pen = streamed_penalty_part(w, base, offsets, G, mean, inv_stab);
    if constexpr (ROWS) {
      if (is_finite(pen)) {
        for (int r = 1; r < G; ++r) {
          const acc_t c = streamed_row_coefficient(w, base, offsets, G, mean, basis + static_cast<int64_t>(r) * G);
          row_energy[r] += inv_stab * c * c;
        }
      } else {
        rescaled_row_energies(w, base, offsets, G, mean, inv_stab, basis, row_energy);
      }
    }
    return {pen, energy_part(mean, inv_stab, G)};
  } else {
    constexpr int MAXG = array_bound(K);
    acc_t f[MAXG];
    load_orbit<MAXG>(w, base, offsets, G, f);
    return loaded_orbit_energy<MAXG, ROWS>(f, G, inv_stab, basis, row_energy, w, base, offsets);
  }
}

// inv_stab * (basis_row . dev)^2 of one orbit (the streamed spectrum walks the rows outermost).
template <typename scalar_t, typename acc_t, typename basis_t, typename off_t>
PK_HOST_DEVICE inline acc_t orbit_row_energy(const scalar_t* __restrict__ w, int64_t base,
                                             const off_t* __restrict__ offsets, int G, acc_t inv_stab,
                                             const basis_t* basis_row) {
  const acc_t mean = streamed_mean<acc_t>(w, base, offsets, G);
  const acc_t c = streamed_row_coefficient(w, base, offsets, G, mean, basis_row);
  if (is_finite(c)) return inv_stab * c * c;
  return rescaled_row_energy(w, base, offsets, G, mean, inv_stab, basis_row);
}

// out at entry g = dW there, from the orbit's values f (not yet centred); signed entries get s dW.
template <int MAXG, typename scalar_t, typename acc_t, typename off_t>
PK_HOST_DEVICE inline void store_orbit_gradient(const acc_t* f, scalar_t* out, int64_t base,
                                                const off_t* __restrict__ offsets, int G, acc_t two_grad_pen,
                                                acc_t two_grad_eq) {
  const acc_t mean = orbit_mean<MAXG>(f, G);
  PK_UNROLL
  for (int g = 0; g < loop_bound(MAXG, G); ++g) {
    if (g >= G) continue;
    store_entry(out, base, offsets[g], gradient_at(f[g], mean, two_grad_pen, two_grad_eq));
  }
}

// Writes dW (or, with two_grad_pen = 0 and two_grad_eq = 1, P(W)) at every entry of one orbit.
// Orbits are disjoint and a repeated entry gets the same value each time, so writers never race.
template <int K, typename scalar_t, typename acc_t, typename off_t>
PK_HOST_DEVICE inline void write_orbit_gradient(const scalar_t* __restrict__ w, scalar_t* __restrict__ out,
                                                int64_t base, const off_t* __restrict__ offsets, int G,
                                                acc_t two_grad_pen, acc_t two_grad_eq) {
  if constexpr (K == 0) {
    const acc_t mean = streamed_mean<acc_t>(w, base, offsets, G);
    for (int g = 0; g < G; ++g) {
      const acc_t f_g = load_entry<acc_t>(w, base, offsets[g]);
      store_entry(out, base, offsets[g], gradient_at(f_g, mean, two_grad_pen, two_grad_eq));
    }
  } else {
    constexpr int MAXG = array_bound(K);
    acc_t f[MAXG];
    load_orbit<MAXG>(w, base, offsets, G, f);
    store_orbit_gradient<MAXG>(f, out, base, offsets, G, two_grad_pen, two_grad_eq);
  }
}

// The same, in place: buf holds W on entry and dW on exit at this orbit's entries (a tile in shared
// memory).  Only the array classes: the whole orbit is read into registers before the first store
// (no __restrict__ here, so the compiler keeps that order), so a repeated entry is never read after
// it was written.
template <int K, typename scalar_t, typename acc_t, typename off_t>
PK_HOST_DEVICE inline void write_orbit_gradient_in_place(scalar_t* buf, int64_t base, const off_t* __restrict__ offsets,
                                                         int G, acc_t two_grad_pen, acc_t two_grad_eq) {
  static_assert(K != 0, "the streamed class would read entries it already wrote");
  constexpr int MAXG = array_bound(K);
  acc_t f[MAXG];
  load_orbit<MAXG>(buf, base, offsets, G, f);
  store_orbit_gradient<MAXG>(f, buf, base, offsets, G, two_grad_pen, two_grad_eq);
}

}  // namespace projkernels
