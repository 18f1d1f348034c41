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

// --- tiles: contiguous runs of whole (out-field, in-field) blocks -----------------------------
//
// Orbits never leave a block, and the blocks of one out-field row are one contiguous slab of the
// weight: block (fo, fi) is `so` segments of stride_in entries, segment a at
// fo * stride_out + a * row_len + fi * stride_in (row_len = c_in * stride_in, so = stride_out /
// row_len, the out-field size).  A tile is the blocks fi0 .. fi0 + width - 1 of one row fo: `so`
// segments of width * stride_in contiguous entries, which a CUDA block reads with coalesced
// (16-byte where aligned) loads into shared memory as an [so, width * stride_in] array and
// resolves its orbits there; the backward writes the tile back the same way.  An offset
// a * row_len + rest of the orbit table becomes a * pitch + rest in the tile (pitch = width *
// stride_in), and block j of the tile starts at j * stride_in.  The tile's orbits are the global
// orbits [(fo * c_in + fi0) * opb, (fo * c_in + fi0 + width) * opb), in the same order.

// Shared memory a tiled block may use: the per-block limit every CUDA GPU since Volta grants
// without opting in, less the static scratch.  A constant, not the queried limit, so that whether a
// weight is tiled (and so the partition of its sums) never depends on the GPU.
constexpr int64_t kTileBudget = 48 * 1024 - 1024;
// A tile holds about this many bytes of weight (fewer blocks per tile for small weights).
constexpr int64_t kTileTargetBytes = 16 * 1024;

struct TilePlan {
  bool ok = false;             // false: the weight is not tiled (odd geometry, or a block too large)
  int64_t so = 0;              // out-field size: segments per tile
  int64_t row_len = 0;         // entries of one weight row: c_in * stride_in
  int64_t blocks_per_tile = 0; // the width of every tile but the last of a row
  int64_t tiles_per_row = 0;
  int64_t n_tiles = 0;
  int64_t offsets_bytes = 0;   // the remapped offsets table, rounded up to 16 bytes
  int64_t tile_bytes = 0;      // so * blocks_per_tile * stride_in entries
  PK_HOST_DEVICE constexpr int64_t shared_bytes() const { return offsets_bytes + tile_bytes; }
};

// target_bytes and min_tiles are parameters for the unit tests; the kernels use the defaults.
PK_HOST_DEVICE constexpr TilePlan plan_tiles(int64_t c_out, int64_t c_in, int64_t stride_out, int64_t stride_in,
                                             int64_t orbits_per_block, int64_t G, int64_t elem_bytes,
                                             int64_t target_bytes = kTileTargetBytes, int64_t min_tiles = kMinChunks) {
  TilePlan p;
  if (c_out < 1 || c_in < 1 || stride_in < 1) return p;
  p.row_len = c_in * stride_in;
  if (stride_out < p.row_len || stride_out % p.row_len != 0) return p;
  p.so = stride_out / p.row_len;
  const int64_t block_bytes = p.so * stride_in * elem_bytes;
  int64_t width = target_bytes / block_bytes;
  width = width < 1 ? 1 : (width > c_in ? c_in : width);
  // Small weights: narrower tiles until there are kMinChunks of them (or one block a tile).
  while (width > 1 && c_out * ceil_div(c_in, width) < min_tiles) width = (width + 1) / 2;
  // A width whose segment is a multiple of 16 bytes keeps every tile start 16-byte aligned (when the
  // weight and its rows are), so the copies can move 16 bytes a thread.
  const int64_t seg = stride_in * elem_bytes;
  int64_t q = 16;
  while (q > 1 && seg % q != 0) q /= 2;
  q = 16 / q;  // blocks per 16-byte multiple
  if (width >= q) width -= width % q;
  p.blocks_per_tile = width;
  p.tiles_per_row = ceil_div(c_in, width);
  p.n_tiles = c_out * p.tiles_per_row;
  p.offsets_bytes = ceil_div(orbits_per_block * G * 4, 16) * 16;
  p.tile_bytes = p.so * width * stride_in * elem_bytes;
  p.ok = p.shared_bytes() <= kTileBudget && p.so * width * stride_in < (int64_t(1) << 31);
  return p;
}

struct Tile {
  int64_t fo, fi0, width;
  int64_t pitch;        // width * stride_in: entries of one segment
  int64_t first_orbit;  // the tile's first global orbit id
};

PK_HOST_DEVICE inline Tile tile_at(const TilePlan& p, int64_t t, int64_t c_in, int64_t stride_in,
                                   int64_t orbits_per_block) {
  Tile tile;
  tile.fo = t / p.tiles_per_row;
  tile.fi0 = (t - tile.fo * p.tiles_per_row) * p.blocks_per_tile;
  tile.width = c_in - tile.fi0 < p.blocks_per_tile ? c_in - tile.fi0 : p.blocks_per_tile;
  tile.pitch = tile.width * stride_in;
  tile.first_orbit = (tile.fo * c_in + tile.fi0) * orbits_per_block;
  return tile;
}

// Global index of entry i of segment a of the tile.
PK_HOST_DEVICE inline int64_t tile_global_index(const Tile& t, int64_t a, int64_t i, int64_t stride_out,
                                                int64_t row_len, int64_t stride_in) {
  return t.fo * stride_out + a * row_len + t.fi0 * stride_in + i;
}

// The tile index of a block-relative offset; false if the offset is not of the form
// a * row_len + rest with a < so and rest < stride_in (then the tile cannot serve the table).
PK_HOST_DEVICE inline bool remap_offset(int64_t off, int64_t row_len, int64_t stride_in, int64_t so, int64_t pitch,
                                        int32_t* out) {
  if (off < 0) return false;
  const int64_t a = off / row_len, rest = off - a * row_len;
  if (a >= so || rest >= stride_in) return false;
  *out = static_cast<int32_t>(a * pitch + rest);
  return true;
}

// The same for an entry of a signed table (orbit_math.h): the entry is remapped, its sign kept.
PK_HOST_DEVICE inline bool remap_offset(SignedOffset off, int64_t row_len, int64_t stride_in, int64_t so,
                                        int64_t pitch, int32_t* out) {
  int32_t v = 0;
  if (!remap_offset(static_cast<int64_t>(entry_of(off.o)), row_len, stride_in, so, pitch, &v)) return false;
  *out = negated(off.o) ? ~v : v;
  return true;
}

// The layer descriptor of a tile held in shared memory: its blocks are the blocks 0 .. width - 1
// of a one-row weight with stride_in between blocks, so the chunk walks of multi_math.h run on
// it unchanged (local orbit l is global orbit first_orbit + l).
template <typename Desc>
PK_HOST_DEVICE inline Desc tile_desc(const Desc& d, const Tile& t, const void* tile_weight, void* tile_grad) {
  Desc local = d;
  local.weight = tile_weight;
  local.out = tile_grad;
  local.c_in = t.width;
  local.stride_out = 0;
  local.n_orbits = t.width * d.orbits_per_block;
  return local;
}

}  // namespace projkernels
