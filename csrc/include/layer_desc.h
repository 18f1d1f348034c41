// The layer descriptor: one weight as every kernel reads it, and the chunk list over many of them.
//
// One struct for every op that walks a weight's orbits: the single-weight penalty, gradient and
// projection, the multi-tensor penalty and its gradient, and the equivariance decay, on the CPU and
// on CUDA.  The host fills it once per call from the validated tensors (op_checks.h, describe and
// check_multi; decay_checks.h); the CUDA kernels receive it by value, as a kernel argument (one
// descriptor, or a launch's group of them, LaunchLayers in cuda_launch.cuh), so no launch reads a
// host-written buffer and every op can be captured in a CUDA graph.
//
// A call over several layers cuts each layer's orbits into chunks of a fixed number of orbits (the
// last chunk of a layer may be shorter); a chunk never spans two layers, so the worker that owns a
// chunk (a CPU task, a CUDA block) sees one dtype, one group order and one geometry.  Chunk
// boundaries depend only on the layer shapes and the chunk size, never on thread counts or on the
// device.
#pragma once

#include <cstdint>

#include "launch_plan.h"  // ceil_div
#include "orbit_math.h"   // PK_HOST_DEVICE

namespace projkernels {

// The dtypes of the weights; the code travels in the descriptor (the decay serves layers of mixed
// dtypes in one pass; the penalty ops take one dtype per call and dispatch on it on the host).
enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// Pointers are device pointers on CUDA, host pointers on CPU.
struct LayerDesc {
  const void* weight;       // W, contiguous
  void* out;                // the tensor written, contiguous, W's dtype and shape: dW or P W (the
                            // gradient ops), or the decay's target (W itself for the in-place step,
                            // W.grad otherwise); nullptr for the penalty's forward
  const int32_t* offsets;   // [orbits_per_block, G], relative to a block's first entry
  const double* inv_stab;   // [orbits_per_block]: 1 / |Stab| (the penalty; the decay's mean needs none)
  double coef_dev;          // the decay's coefficients: out += coef_dev (W - P W) + coef_mean P W
  double coef_mean;
  int64_t c_in;
  int64_t stride_out;
  int64_t stride_in;
  int64_t orbits_per_block;
  int64_t n_orbits;         // orbits_per_block * c_out * c_in
  int64_t chunk_begin;      // this layer's chunks are [chunk_begin, chunk_end) of the chunk list
  int64_t chunk_end;
  int32_t G;
  int32_t dtype;            // a DType
  int32_t signed_offsets;   // 1: the table holds a negative offset (orbit_math.h, entry_of): read it as
                            // SignedOffset (SIGNED_SWITCH); 0: trivial / regular fields, read as int32_t
};

// Orbits [first, last) of layer `layer`.
struct Chunk {
  int64_t first;
  int64_t last;
  int32_t layer;
  int32_t unused;
};

// Sets every layer's chunk range and returns the number of chunks.
inline int64_t assign_chunks(LayerDesc* layers, int64_t n_layers, int64_t chunk_orbits) {
  int64_t n = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    layers[l].chunk_begin = n;
    n += ceil_div(layers[l].n_orbits, chunk_orbits);
    layers[l].chunk_end = n;
  }
  return n;
}

// Orbits [first, last) of chunk c of layer d (d.chunk_begin <= c < d.chunk_end).
struct ChunkRange {
  int64_t first;
  int64_t last;
};
PK_HOST_DEVICE inline ChunkRange chunk_range(const LayerDesc& d, int64_t c, int64_t chunk_orbits) {
  const int64_t first = (c - d.chunk_begin) * chunk_orbits;
  return ChunkRange{first, first + chunk_orbits < d.n_orbits ? first + chunk_orbits : d.n_orbits};
}

// The index in layers[0, n_layers) of the layer owning chunk c, for a chunk of one of these layers
// (chunk ranges ascend with the layer index).  A CUDA block runs it on descriptors passed as a kernel
// argument: every thread reads the same words, so the scan costs a few broadcast loads.
PK_HOST_DEVICE inline int layer_of_chunk(const LayerDesc* layers, int n_layers, int64_t c) {
  int j = 0;
  while (j + 1 < n_layers && layers[j].chunk_end <= c) ++j;
  return j;
}

// Writes the chunk list of layers whose ranges assign_chunks set (the CPU kernels' task list).
inline void list_chunks(const LayerDesc* layers, int64_t n_layers, int64_t chunk_orbits, Chunk* chunks) {
  for (int64_t l = 0; l < n_layers; ++l) {
    const LayerDesc& d = layers[l];
    for (int64_t c = d.chunk_begin; c < d.chunk_end; ++c) {
      const ChunkRange r = chunk_range(d, c, chunk_orbits);
      chunks[c] = Chunk{r.first, r.last, static_cast<int32_t>(l), 0};
    }
  }
}

}  // namespace projkernels
