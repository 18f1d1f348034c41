// Equivariance decay: the per-orbit update shared by the CPU (cpu/decay_kernels.cpp) and CUDA
// (cuda/decay_kernels.cu) implementations of the projkernels_C::multi_decay_ ops.
//
// One call updates the "target" tensors of many layers in place from their weights:
//
//   target <- target + c_dev (W - P W) + c_mean P W
//
// With target = W, c_dev = -2 lr lambda_perp and c_mean = -2 lr lambda_G this is the decoupled
// decay step; with target = W.grad, c_dev = 2 lambda_perp and c_mean = 2 lambda_G it adds the
// penalty's gradient.  On an orbit, P W is the orbit mean, so the update needs one read of the
// orbit, its mean, and one write.
//
// Every layer carries its own dtype and coefficients, so layers of mixed dtypes share one pass.
// Chunks (a fixed number of orbits, never spanning two layers) are the unit of work of a CPU task
// or a CUDA block.  No value is summed across orbits, so the result does not depend on the chunking
// or on the thread count: the update is deterministic bit for bit.
#pragma once

#include <cstdint>

#include "layer_desc.h"
#include "orbit_math.h"

namespace projkernels {
namespace decay {

// Each layer is a LayerDesc (layer_desc.h): its target is `out`, its coefficients coef_dev and
// coef_mean, its dtype code `dtype`.  Chunks, assign_chunks and list_chunks: layer_desc.h too.

// old + (coef_dev (f_g - mean) + coef_mean mean), the update of one entry.  Where it is not finite
// although its inputs are (f_g - mean overflows for values near the largest finite value of
// opposite signs, or a term does where the sum does not), the same terms on values scaled by kDown
// (exact, orbit_math.h), scaled back.
template <typename acc_t>
PK_HOST_DEVICE inline acc_t decay_value(acc_t old, acc_t f_g, acc_t mean, acc_t coef_dev, acc_t coef_mean) {
  const acc_t v = old + (coef_dev * (f_g - mean) + coef_mean * mean);
  if (is_finite(v)) return v;
  const acc_t down = static_cast<acc_t>(kDown), m = mean * down;
  return (old * down + (coef_dev * (f_g * down - m) + coef_mean * m)) * static_cast<acc_t>(kUp);
}

// The decay of one orbit.  Every value of the orbit (of W, and of the target when it is not W) is
// read before anything is written: an entry that the orbit lists several times (a non-trivial
// stabiliser) is then written the same value each time, and with target == W the update reads the
// old W only.  Hence no __restrict__ here: target and w may be the same array.
template <int MAXG, bool IN_PLACE, typename scalar_t, typename acc_t, typename off_t>
PK_HOST_DEVICE inline void decay_orbit(const scalar_t* w, scalar_t* target, int64_t base,
                                       const off_t* offsets, int G, acc_t coef_dev, acc_t coef_mean) {
  acc_t f[MAXG];
  load_orbit<MAXG>(w, base, offsets, G, f);
  const acc_t mean = orbit_mean<MAXG>(f, G);
  acc_t t[MAXG];
  if (!IN_PLACE) load_orbit<MAXG>(static_cast<const scalar_t*>(target), base, offsets, G, t);
  PK_UNROLL
  for (int g = 0; g < loop_bound(MAXG, G); ++g) {
    if (g >= G) continue;
    const acc_t old = IN_PLACE ? f[g] : t[g];
    // In f's terms (f = s W, P W = s mean): s new = s old + coef_dev (f - mean) + coef_mean mean.
    store_entry(target, base, offsets[g], decay_value(old, f[g], mean, coef_dev, coef_mean));
  }
}

// The same update for the streamed class (orders above kMaxArrayOrder: no per-thread array).  The
// orbit is read twice from memory.  An entry listed several times (|Stab| > 1) must be updated once,
// from its old value: the listing of e's orbit holds each entry |Stab| times, so counting e's own
// occurrences gives |Stab|, and only then is each entry checked against the earlier ones (O(|G|^2)
// per orbit, paid by groups of order above kMaxArrayOrder with non-trivial stabilisers alone).
template <bool IN_PLACE, typename scalar_t, typename acc_t, typename off_t>
PK_HOST_DEVICE inline void decay_orbit_streamed(const scalar_t* w, scalar_t* target, int64_t base,
                                                const off_t* offsets, int G, acc_t coef_dev, acc_t coef_mean) {
  // Entries compared without their signs: an entry listed with both signs has mean 0 and is
  // written the same value either way, but must still be updated once.
  int stab = 0;
  for (int g = 0; g < G; ++g) stab += entry_index(offsets[g]) == entry_index(offsets[0]);
  const acc_t mean = streamed_mean<acc_t>(w, base, offsets, G);
  for (int g = 0; g < G; ++g) {
    bool seen = false;
    for (int h = 0; stab > 1 && h < g && !seen; ++h) seen = entry_index(offsets[h]) == entry_index(offsets[g]);
    if (seen) continue;
    const acc_t wv = load_entry<acc_t>(w, base, offsets[g]);  // first visit: not yet written
    const acc_t old = IN_PLACE ? wv : load_entry<acc_t>(static_cast<const scalar_t*>(target), base, offsets[g]);
    store_entry(target, base, offsets[g], decay_value(old, wv, mean, coef_dev, coef_mean));
  }
}

// The decay of orbits first, first + step, ... < last of one layer: a CPU task walks a whole chunk
// (step 1), a CUDA thread every blockDim-th orbit of its block's chunk.  K is the group-order class
// of static_switch.h (GROUP_ORDER_SWITCH): an array of array_bound(K) values per orbit, or streamed
// for K == 0.
template <int K, bool IN_PLACE, typename scalar_t, typename acc_t, typename off_t = int32_t>
PK_HOST_DEVICE inline void decay_chunk(const LayerDesc& d, int64_t first, int64_t last, int64_t step) {
  if (first >= last) return;
  const off_t* offsets = reinterpret_cast<const off_t*>(d.offsets);  // SignedOffset: d.signed_offsets
  const int G = order_of(K, d.G);
  const scalar_t* w = static_cast<const scalar_t*>(d.weight);
  scalar_t* target = static_cast<scalar_t*>(d.out);
  const acc_t c_dev = static_cast<acc_t>(d.coef_dev), c_mean = static_cast<acc_t>(d.coef_mean);
  OrbitWalk it(first, d.orbits_per_block, d.c_in, d.stride_out, d.stride_in);
  for (int64_t id = first; id < last; id += step, it.advance(step)) {
    if constexpr (K == 0) {
      decay_orbit_streamed<IN_PLACE>(w, target, it.base, offsets + it.orbit * G, G, c_dev, c_mean);
    } else {
      decay_orbit<array_bound(K), IN_PLACE>(w, target, it.base, offsets + it.orbit * G, G, c_dev, c_mean);
    }
  }
}

}  // namespace decay
}  // namespace projkernels
