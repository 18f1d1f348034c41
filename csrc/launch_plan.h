// Launch planning of the single-weight kernels, in plain host/device code so that the C++ unit
// tests (tests/cpp) check it on the CPU: how the orbits are cut into chunks (one CUDA block and one
// partial sum each) and what goes into a block's shared memory.
//
// Both depend only on the problem (orbit count, group order, dtype, table size) and on the
// shared-memory budget, never on the GPU's SM count or on timing, so the partition of every sum
// is the same on every GPU and every run: results are bitwise reproducible.
#pragma once

#include <cstdint>

#include "orbit_math.h"

namespace projkernels {

// A thread's share of a chunk is about this many bytes of weight, up to kMaxOrbitsPerThread orbits:
// enough independent loads in flight per thread to cover DRAM latency, and chunks of 16 KiB (fp32)
// at 256 threads, so a 150 MB weight gives thousands of blocks, many waves on any current GPU.
constexpr int64_t kBytesPerThread = 64;
constexpr int64_t kMaxOrbitsPerThread = 8;
// Below this many chunks a weight gets fewer orbits per thread (down to one), so that small weights
// still spread over the whole GPU.
constexpr int64_t kMinChunks = 1024;
// The largest offsets table a block copies to shared memory.
constexpr int64_t kMaxStagedOffsetBytes = 16 * 1024;

PK_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Orbits per chunk: a multiple of `threads`; chunk c holds orbits [c * chunk, (c + 1) * chunk).
PK_HOST_DEVICE constexpr int64_t plan_chunk_orbits(int64_t n_orbits, int64_t G, int64_t elem_bytes, int64_t threads) {
  int64_t per_thread = kMaxOrbitsPerThread;
  while (per_thread > 1 && per_thread * G * elem_bytes > kBytesPerThread) per_thread /= 2;
  while (per_thread > 1 && ceil_div(n_orbits, per_thread * threads) < kMinChunks) per_thread /= 2;
  return per_thread * threads;
}

// Dynamic shared memory of a block: [basis as acc_t, G*G (spectrum only)] [offsets, opb*G int32].
// A table that does not fit is read from global memory instead (through L1/L2), so any group order
// launches within the budget: the device's per-block limit without opt-in, less the kernel's
// static shared memory.
struct SharedPlan {
  int64_t basis_bytes = 0;    // 0: the basis is read from global memory
  int64_t offsets_bytes = 0;  // 0: the offsets are read from global memory
  PK_HOST_DEVICE constexpr int64_t total() const { return basis_bytes + offsets_bytes; }
  PK_HOST_DEVICE constexpr bool stage_basis() const { return basis_bytes > 0; }
  PK_HOST_DEVICE constexpr bool stage_offsets() const { return offsets_bytes > 0; }
};

PK_HOST_DEVICE constexpr SharedPlan plan_shared(int64_t G, int64_t orbits_per_block, int64_t acc_bytes,
                                                bool spectrum, int64_t chunk_bytes, int64_t budget) {
  SharedPlan p;
  const int64_t basis = spectrum ? G * G * acc_bytes : 0;
  if (basis > 0 && basis <= budget) p.basis_bytes = basis;
  const int64_t offs = orbits_per_block * G * 4;
  // Every block copies the whole table, so staging pays only when the table is small next to the
  // chunk the block reads (each offset is then used several times from shared memory).
  if (offs <= kMaxStagedOffsetBytes && offs <= budget - p.basis_bytes && 4 * offs <= chunk_bytes)
    p.offsets_bytes = offs;
  return p;
}

}  // namespace projkernels
