// The chunk walks of the penalty ops: the per-chunk math over one layer descriptor (layer_desc.h),
// shared by the CPU kernels (cpu/orbit_kernels.cpp) and the CUDA kernels (cuda/multi_kernels.cu,
// cuda/orbit_kernels.cu).
//
// A call covers L weights of one dtype.  Each layer's orbits are cut into chunks of a fixed number
// of orbits (the last chunk of a layer may be shorter); a chunk never spans two layers, so the
// worker that owns a chunk (a CPU task, a CUDA block) sees one group order and one geometry.  Chunk
// boundaries depend only on the layer shapes and the chunk size, never on thread counts or on the
// device, and each layer's chunk partials are summed in chunk order: results are reproducible bit for
// bit.  With the CPU chunk size equal to the single-layer kernel's, a layer's multi-op result is the
// single-layer op's result bit for bit.
#pragma once

#include <cstdint>

#include "launch_plan.h"
#include "layer_desc.h"
#include "orbit_math.h"

namespace projkernels {

// LayerDesc, Chunk and the chunk list: layer_desc.h (shared with the decay and the single-weight ops).
//
// offsets is the layer's table read as int32_t, or as SignedOffset where the layer's table holds a
// negative offset (d.signed_offsets; orbit_math.h, SIGNED_SWITCH in static_switch.h).

// pen += penalty part and eq += energy part of the orbits first, first + step, ... < last of one
// layer (and, with ROWS, row_energy[r] += its row energies).  A CPU task walks a whole chunk
// (step 1); a CUDA thread walks every blockDim-th orbit of its block's chunk.  offsets (and basis)
// may point at a copy of the table (for example in shared memory).  K is the group-order class of
// d.G (static_switch.h).  B > 1 (the exact classes, no rows): the walk goes in batches of B orbits
// whose loads are all issued before any is used (orbit_math.h, batch_orbits); the sums are the
// same, added in the same order.
template <int K, bool ROWS, typename scalar_t, typename acc_t, typename sum_t, typename basis_t = acc_t, int B = 1,
          typename off_t>
PK_HOST_DEVICE inline void chunk_energies(const LayerDesc& d, const off_t* __restrict__ offsets, int64_t first,
                                          int64_t last, int64_t step, sum_t& pen, sum_t& eq,
                                          const basis_t* basis = nullptr, acc_t* row_energy = nullptr) {
  const scalar_t* w = static_cast<const scalar_t*>(d.weight);
  const int G = order_of(K, d.G);
  if (first >= last) return;
  OrbitWalk it(first, d.orbits_per_block, d.c_in, d.stride_out, d.stride_in);
  int64_t id = first;
  if constexpr (B > 1) {
    // Whole batches of B orbits: every load of the batch first, then the orbits' sums in walk
    // order; the orbits left over go one by one below.
    static_assert(K > 0 && !ROWS, "batches are for the exact classes' training sums");
    for (; id + (B - 1) * step < last; id += B * step) {
      acc_t f[B][K];
      acc_t inv_stab[B];
      PK_UNROLL_BATCH
      for (int b = 0; b < B; ++b) {
        load_orbit<K>(w, it.base, offsets + it.orbit * G, G, f[b]);
        inv_stab[b] = static_cast<acc_t>(d.inv_stab[it.orbit]);
        it.advance(step);
      }
      PK_UNROLL_BATCH
      for (int b = 0; b < B; ++b) {
        const OrbitEnergy<acc_t> e = loaded_orbit_energy<K, false>(f[b], G, inv_stab[b]);
        pen += static_cast<sum_t>(e.pen);
        eq += static_cast<sum_t>(e.eq);
      }
    }
  }
  for (; id < last; id += step, it.advance(step)) {
    const OrbitEnergy<acc_t> e = orbit_energy<K, ROWS, scalar_t, acc_t, basis_t, off_t>(
        w, it.base, offsets + it.orbit * G, G, static_cast<acc_t>(d.inv_stab[it.orbit]), basis, row_energy);
    pen += static_cast<sum_t>(e.pen);
    eq += static_cast<sum_t>(e.eq);
  }
}

// The energy of one basis row over the same orbits, streamed (the spectrum of the streamed class,
// whose row energies do not fit in a thread's registers, walks the rows outermost).
template <typename scalar_t, typename acc_t, typename basis_t, typename off_t>
PK_HOST_DEVICE inline acc_t chunk_row_energy(const LayerDesc& d, const off_t* __restrict__ offsets, int64_t first,
                                             int64_t last, int64_t step, const basis_t* basis_row) {
  const scalar_t* w = static_cast<const scalar_t*>(d.weight);
  acc_t s = acc_t(0);
  if (first >= last) return s;
  OrbitWalk it(first, d.orbits_per_block, d.c_in, d.stride_out, d.stride_in);
  for (int64_t id = first; id < last; id += step, it.advance(step))
    s += orbit_row_energy(w, it.base, offsets + it.orbit * d.G, d.G, static_cast<acc_t>(d.inv_stab[it.orbit]),
                          basis_row);
  return s;
}

// dW = 2 grad_pen (W - P W) + 2 grad_eq P W on the orbits first, first + step, ... < last.
// Orbits are disjoint and a repeated entry gets the same value each time, so writers never race.
template <int K, typename scalar_t, typename acc_t, int B = 1, typename off_t>
PK_HOST_DEVICE inline void chunk_gradient(const LayerDesc& d, const off_t* __restrict__ offsets, int64_t first,
                                          int64_t last, int64_t step, acc_t two_pen, acc_t two_eq) {
  const scalar_t* w = static_cast<const scalar_t*>(d.weight);
  scalar_t* out = static_cast<scalar_t*>(d.out);
  const int G = order_of(K, d.G);
  if (first >= last) return;
  OrbitWalk it(first, d.orbits_per_block, d.c_in, d.stride_out, d.stride_in);
  int64_t id = first;
  if constexpr (B > 1) {
    // Whole batches of B orbits, as in chunk_energies: every load of the batch, then every store.
    static_assert(K > 0, "batches are for the exact classes");
    // The store pass walks the batch again with its own copy of the walk (fewer registers than
    // keeping every orbit's base and table row).
    for (; id + (B - 1) * step < last; id += B * step) {
      acc_t f[B][K];
      OrbitWalk st = it;
      PK_UNROLL_BATCH
      for (int b = 0; b < B; ++b) {
        load_orbit<K>(w, it.base, offsets + it.orbit * G, G, f[b]);
        it.advance(step);
      }
      PK_UNROLL_BATCH
      for (int b = 0; b < B; ++b) {
        store_orbit_gradient<K>(f[b], out, st.base, offsets + st.orbit * G, G, two_pen, two_eq);
        st.advance(step);
      }
    }
  }
  for (; id < last; id += step, it.advance(step))
    write_orbit_gradient<K>(w, out, it.base, offsets + it.orbit * G, G, two_pen, two_eq);
}

// chunk_gradient in place (d.weight == d.out, a tile in shared memory); array classes only.
template <int K, typename scalar_t, typename acc_t, typename off_t>
PK_HOST_DEVICE inline void chunk_gradient_in_place(const LayerDesc& d, const off_t* __restrict__ offsets,
                                                   int64_t first, int64_t last, int64_t step, acc_t two_pen,
                                                   acc_t two_eq) {
  scalar_t* buf = static_cast<scalar_t*>(d.out);
  const int G = order_of(K, d.G);
  if (first >= last) return;
  OrbitWalk it(first, d.orbits_per_block, d.c_in, d.stride_out, d.stride_in);
  for (int64_t id = first; id < last; id += step, it.advance(step))
    write_orbit_gradient_in_place<K>(buf, it.base, offsets + it.orbit * G, G, two_pen, two_eq);
}

}  // namespace projkernels
