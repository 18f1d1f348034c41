// CPU kernels of the raw finite-group ops (schemas in ops/schemas.cpp): fused_forward and
// fused_backward over one weight, multi_forward and multi_backward over many.  The per-orbit math is
// orbit_math.h, the chunk walks multi_math.h, the tile plan launch_plan.h: the CUDA kernels and the
// C++ unit tests run the same code.  The public ops built on these (penalty_energy, project, ...)
// are in ops/public_ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "launch_plan.h"
#include "multi_math.h"
#include "op_common.h"  // read_scalar
#include "op_checks.h"
#include "orbit_math.h"
#include "static_switch.h"

namespace projkernels {
namespace {

// Orbits per reduction chunk.  Chunk boundaries depend only on the orbit count, never on the number
// of threads, and chunk partials are summed in chunk order: results are bitwise reproducible.
constexpr int64_t kChunk = 256;

// off_t: int32_t, or SignedOffset for a table with negative offsets (orbit_math.h, SIGNED_SWITCH).
template <typename scalar_t, int K, typename off_t = int32_t>
void forward_cpu_kernel(const at::Tensor& w, const OrbitArgs& t, const at::Tensor& basis_acc,
                        bool with_spectrum, std::vector<double>& partials, int64_t n_chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const off_t* offs = reinterpret_cast<const off_t*>(t.offsets.const_data_ptr<int32_t>());
  const double* inv_stab = t.inv_stab.const_data_ptr<double>();
  const acc_t* basis = with_spectrum ? basis_acc.const_data_ptr<acc_t>() : nullptr;
  const int G = order_of(K, static_cast<int>(t.G));
  const int64_t n = t.n_orbits(), width = G + 1;

  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> rows(with_spectrum ? G : 0);
    std::vector<double> row_sum(with_spectrum ? G : 0);
    for (int64_t c = c0; c < c1; ++c) {
      double pen = 0, eq = 0;
      std::fill(row_sum.begin(), row_sum.end(), 0.0);
      const int64_t end = std::min(n, (c + 1) * kChunk);
      OrbitWalk it(c * kChunk, t.orbits_per_block, t.c_in, t.stride_out, t.stride_in);
      for (int64_t id = c * kChunk; id < end; ++id, it.advance(1)) {
        const off_t* o = offs + it.orbit * G;
        const acc_t is = static_cast<acc_t>(inv_stab[it.orbit]);
        OrbitEnergy<acc_t> e;
        if (with_spectrum) {
          // Each orbit's row energies in acc_t, their sum over the chunk in double.
          std::fill(rows.begin(), rows.end(), acc_t(0));
          e = orbit_energy<K, true>(wp, it.base, o, G, is, basis, rows.data());
          for (int r = 1; r < G; ++r) row_sum[r] += static_cast<double>(rows[r]);
        } else {
          e = orbit_energy<K, false>(wp, it.base, o, G, is);
        }
        pen += static_cast<double>(e.pen);
        eq += static_cast<double>(e.eq);
      }
      double* out = partials.data() + c * width;
      out[0] = pen;
      out[1] = eq;
      for (int r = 1; r < G && with_spectrum; ++r) out[r + 1] = row_sum[r];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(
    const at::Tensor& weight, const at::Tensor& offsets, const at::Tensor& inv_stab, const at::Tensor& basis,
    const at::Tensor& row_irrep, int64_t n_irreps, int64_t c_out, int64_t c_in, int64_t stride_out,
    int64_t stride_in, int64_t signed_offsets, bool with_spectrum) {
  const OrbitArgs t = check_fused_forward(weight, offsets, inv_stab, basis, row_irrep, n_irreps, c_out, c_in,
                                          stride_out, stride_in, signed_offsets != 0);
  const auto acc = acc_type_of(weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  // The basis is only read for the spectrum: the training call converts nothing.
  const at::Tensor basis_acc = with_spectrum ? basis.to(acc).contiguous() : at::Tensor();
  const int64_t G = t.G, n_chunks = (t.n_orbits() + kChunk - 1) / kChunk;
  std::vector<double> partials(n_chunks * (G + 1), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fused_forward_cpu", [&] {
    SIGNED_SWITCH(t.signed_offsets, OFF, [&] {
      GROUP_ORDER_SWITCH(G, K, [&] { forward_cpu_kernel<scalar_t, K, OFF>(w, t, basis_acc, with_spectrum, partials, n_chunks); });
    });
  });

  std::vector<double> total(G + 1, 0.0);
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int64_t j = 0; j < G + 1; ++j) total[j] += partials[c * (G + 1) + j];

  std::vector<double> spec(n_irreps, 0.0);
  if (with_spectrum) {
    // total = [penalty, eq, row 1, ..., row G-1]: row r sits at total[1 + r].
    rows_to_irreps(total.data() + 1, total[1], row_irrep.contiguous().const_data_ptr<int64_t>(),
                   static_cast<int>(G), spec.data());
  }
  // Results are written straight in the accumulation dtype: no temporaries, no conversion ops.
  const auto opts = weight.options().dtype(acc);
  at::Tensor pen = at::empty({}, opts), eq = at::empty({}, opts), spectrum = at::empty({n_irreps}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_forward_cpu_results", [&] {
    *pen.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total[0]);
    *eq.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total[1]);
    std::transform(spec.begin(), spec.end(), spectrum.mutable_data_ptr<scalar_t>(),
                   [](double v) { return static_cast<scalar_t>(v); });
  });
  return {pen, eq, spectrum};
}

// The backward over tiles of whole field blocks (launch_plan.h), as the CUDA tiled kernel does it:
// copy the tile's segments into a buffer, write dW over it in place orbit by orbit, copy it back.
// Bits equal the orbit-by-orbit path (same arithmetic per orbit); running it here puts the tile
// layout, the offset remapping and the in-place writer under every CPU test.
template <typename scalar_t, int K, typename off_t>
void backward_cpu_tiles(const at::Tensor& w, scalar_t* op, const OrbitArgs& t, const TilePlan& tp,
                        at::opmath_type<scalar_t> two_pen, at::opmath_type<scalar_t> two_eq) {
  const int G = order_of(K, static_cast<int>(t.G));
  const off_t* offs = reinterpret_cast<const off_t*>(t.offsets.const_data_ptr<int32_t>());
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const LayerDesc d = describe(t, w, op);
  const int64_t n_offs = t.orbits_per_block * G;
  at::parallel_for(0, tp.n_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> buf(static_cast<size_t>(tp.tile_bytes / static_cast<int64_t>(sizeof(scalar_t))));
    std::vector<int32_t> tile_offs(n_offs);
    int64_t remapped_pitch = -1;  // tiles of one width share the remapped table
    bool bad = false;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Tile tile = tile_at(tp, ti, t.c_in, t.stride_in, t.orbits_per_block);
      if (tile.pitch != remapped_pitch) {
        bad = false;
        for (int64_t i = 0; i < n_offs; ++i)
          bad |= !remap_offset(offs[i], tp.row_len, t.stride_in, tp.so, tile.pitch, &tile_offs[i]);
        remapped_pitch = tile.pitch;
      }
      const int64_t n_local = tile.width * t.orbits_per_block;
      if (bad) {  // a table that does not fit the tile layout: straight from the weight
        chunk_gradient<K, scalar_t>(d, offs, tile.first_orbit, tile.first_orbit + n_local, 1, two_pen, two_eq);
        continue;
      }
      for (int64_t a = 0; a < tp.so; ++a)
        std::copy_n(wp + tile_global_index(tile, a, 0, t.stride_out, tp.row_len, t.stride_in), tile.pitch,
                    buf.data() + a * tile.pitch);
      // The remapped offsets keep the table's encoding (remap_offset), so they are read as off_t too.
      chunk_gradient_in_place<K, scalar_t>(tile_desc(d, tile, buf.data(), buf.data()),
                                           reinterpret_cast<const off_t*>(tile_offs.data()), 0, n_local, 1, two_pen,
                                           two_eq);
      for (int64_t a = 0; a < tp.so; ++a)
        std::copy_n(buf.data() + a * tile.pitch, tile.pitch,
                    op + tile_global_index(tile, a, 0, t.stride_out, tp.row_len, t.stride_in));
    }
  });
}

template <typename scalar_t, int K, typename off_t = int32_t>
void backward_cpu_kernel(const at::Tensor& w, const OrbitArgs& t, double grad_pen, double grad_eq, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const off_t* offs = reinterpret_cast<const off_t*>(t.offsets.const_data_ptr<int32_t>());
  const int G = order_of(K, static_cast<int>(t.G));
  const acc_t two_pen = static_cast<acc_t>(2 * grad_pen), two_eq = static_cast<acc_t>(2 * grad_eq);

  if constexpr (K != 0) {  // the streamed class would read entries it already wrote
    const TilePlan tp = plan_tiles(t.c_out, t.c_in, t.stride_out, t.stride_in, t.orbits_per_block, G,
                                   static_cast<int64_t>(sizeof(scalar_t)));
    if (tp.ok) return backward_cpu_tiles<scalar_t, K, off_t>(w, op, t, tp, two_pen, two_eq);
  }
  at::parallel_for(0, t.n_orbits(), kChunk, [&](int64_t i0, int64_t i1) {
    OrbitWalk it(i0, t.orbits_per_block, t.c_in, t.stride_out, t.stride_in);
    for (int64_t id = i0; id < i1; ++id, it.advance(1))
      write_orbit_gradient<K>(wp, op, it.base, offs + it.orbit * G, G, two_pen, two_eq);
  });
}

at::Tensor fused_backward_cpu(const at::Tensor& weight, const at::Tensor& grad_penalty, const at::Tensor& grad_eq,
                              const at::Tensor& offsets, const at::Tensor& inv_stab, int64_t c_out, int64_t c_in,
                              int64_t stride_out, int64_t stride_in, int64_t signed_offsets) {
  const OrbitArgs t = check_fused_backward(weight, grad_penalty, grad_eq, offsets, inv_stab, c_out, c_in, stride_out,
                                           stride_in, signed_offsets != 0);
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  // check_grad guarantees one value; read in place rather than through .item() (an op dispatch each).
  const double gp = read_scalar(grad_penalty), ge = read_scalar(grad_eq);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fused_backward_cpu", [&] {
    SIGNED_SWITCH(t.signed_offsets, OFF, [&] {
      GROUP_ORDER_SWITCH(t.G, K, [&] { backward_cpu_kernel<scalar_t, K, OFF>(w, t, gp, ge, out); });
    });
  });
  return out;
}

// --- multi-tensor ops: every layer of one dtype in one pass (multi_math.h) ---------------------

// The single-layer chunk size, so that each layer's result equals fused_forward's bit for bit.
constexpr int64_t kMultiChunk = kChunk;

std::vector<Chunk> plan(LayerArgs& a) {
  const int64_t L = static_cast<int64_t>(a.layers.size());
  std::vector<Chunk> chunks(assign_chunks(a.layers.data(), L, kMultiChunk));
  list_chunks(a.layers.data(), L, kMultiChunk, chunks.data());
  return chunks;
}

// fn(scalar_tag, c, chunk, layer) for every chunk c, in parallel over chunks, in the weights' dtype
// (scalar_tag: a value of that dtype, for its type).
template <typename Fn>
void for_each_chunk(const LayerArgs& a, const std::vector<Chunk>& chunks, Fn&& fn) {
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multi_cpu", [&] {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) fn(scalar_t{}, c, chunks[c], a.layers[chunks[c].layer]);
    });
  });
}

std::vector<double> read_per_layer(const at::Tensor& g, int64_t L) {
  std::vector<double> out(L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "read_per_layer", [&] {
    const scalar_t* p = g.const_data_ptr<scalar_t>();
    const int64_t stride = g.stride(0);
    for (int64_t l = 0; l < L; ++l) out[l] = static_cast<double>(p[l * stride]);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> multi_forward_cpu(at::TensorList weights, at::TensorList offsets,
                                                     at::TensorList inv_stab, at::IntArrayRef geometry) {
  LayerArgs a = check_multi_forward(weights, offsets, inv_stab, geometry);
  const std::vector<Chunk> chunks = plan(a);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size()), L = static_cast<int64_t>(a.layers.size());
  std::vector<double> partials(2 * n_chunks, 0.0);

  for_each_chunk(a, chunks, [&](auto tag, int64_t c, const Chunk& ch, const LayerDesc& d) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    double pen = 0, eq = 0;
    SIGNED_SWITCH(d.signed_offsets, OFF, [&] {
      GROUP_ORDER_SWITCH(d.G, K, [&] {
        chunk_energies<K, false, scalar_t, acc_t, double>(d, reinterpret_cast<const OFF*>(d.offsets), ch.first, ch.last,
                                                          1, pen, eq);
      });
    });
    partials[2 * c] = pen;
    partials[2 * c + 1] = eq;
  });

  // Per-layer sums in double, written straight in the accumulation dtype (no conversion ops).
  const auto acc = acc_type_of(a.dtype);
  const auto opts = weights[0].options().dtype(acc);
  at::Tensor pen = at::empty({L}, opts), eq = at::empty({L}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "multi_forward_cpu_results", [&] {
    scalar_t* pp = pen.mutable_data_ptr<scalar_t>();
    scalar_t* ep = eq.mutable_data_ptr<scalar_t>();
    for (int64_t l = 0; l < L; ++l) {
      double p = 0, e = 0;
      for (int64_t c = a.layers[l].chunk_begin; c < a.layers[l].chunk_end; ++c) {
        p += partials[2 * c];
        e += partials[2 * c + 1];
      }
      pp[l] = static_cast<scalar_t>(p);
      ep[l] = static_cast<scalar_t>(e);
    }
  });
  return {pen, eq};
}

std::vector<at::Tensor> multi_backward_cpu(at::TensorList weights, const at::Tensor& grad_penalty,
                                           const at::Tensor& grad_eq, at::TensorList offsets, at::TensorList inv_stab,
                                           at::IntArrayRef geometry) {
  LayerArgs a = check_multi_backward(weights, grad_penalty, grad_eq, offsets, inv_stab, geometry);
  const std::vector<Chunk> chunks = plan(a);
  const int64_t L = static_cast<int64_t>(a.layers.size());
  std::vector<at::Tensor> out = multi_grad_outputs(a);
  // Read in place, strides honoured (an expanded total gradient has stride 0): no conversion ops.
  const std::vector<double> gp = read_per_layer(grad_penalty, L), ge = read_per_layer(grad_eq, L);
  const double* gpp = gp.data();
  const double* gep = ge.data();

  for_each_chunk(a, chunks, [&](auto tag, int64_t, const Chunk& ch, const LayerDesc& d) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    // As fused_backward: 2 * grad in double, then rounded to acc_t.
    const acc_t two_pen = static_cast<acc_t>(2 * gpp[ch.layer]), two_eq = static_cast<acc_t>(2 * gep[ch.layer]);
    SIGNED_SWITCH(d.signed_offsets, OFF, [&] {
      GROUP_ORDER_SWITCH(d.G, K, [&] {
        chunk_gradient<K, scalar_t, acc_t>(d, reinterpret_cast<const OFF*>(d.offsets), ch.first, ch.last, 1, two_pen,
                                           two_eq);
      });
    });
  });
  return out;
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, CPU, m) {
  m.impl("fused_forward", &projkernels::fused_forward_cpu);
  m.impl("fused_backward", &projkernels::fused_backward_cpu);
  m.impl("multi_forward", &projkernels::multi_forward_cpu);
  m.impl("multi_backward", &projkernels::multi_backward_cpu);
}
