// CPU kernels of the raw finite-group ops (schemas in ops/schemas.cpp): fused_forward and
// fused_backward over one weight, multi_forward and multi_backward over many.  The walk is
// include/cpu_orbit_batches.h (a batch of consecutive orbits gathered into L1, the per-orbit math of
// orbit_math.h as vector loops across them); the public ops built on these (penalty_energy,
// project, ...) are in ops/public_ops.cpp.  A single weight is a one-layer call of the multi-tensor
// walk, so each layer's multi-op result is the single-weight op's result bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "layer_desc.h"
#include "op_common.h"  // read_scalar
#include "op_checks.h"
#include "cpu_orbit_batches.h"
#include "orbit_math.h"
#include "static_switch.h"

namespace projkernels {
namespace {

using cpu::BatchTable;
using cpu::Scratch;

// fn(K, SIGNED) with K the group-order class of G (static_switch.h) and SIGNED whether the table
// holds a negative offset, both as compile-time constants.
template <typename Fn>
void with_class(int G, bool is_signed, Fn&& fn) {
  GROUP_ORDER_SWITCH(G, K, [&] {
    if (is_signed) {
      fn(std::integral_constant<int, K>{}, std::true_type{});
    } else {
      fn(std::integral_constant<int, K>{}, std::false_type{});
    }
  });
}

// Forward over layers of one dtype: partials[c * width + j] for chunk c, j = 0 penalty, 1 energy,
// 1 + r the row energy of row r (with ROWS); width = 1 + the largest |G|.
template <typename scalar_t, bool ROWS>
void forward_layers(const std::vector<LayerDesc>& layers, const std::vector<Chunk>& chunks,
                    const std::vector<BatchTable<at::opmath_type<scalar_t>>>& tables, const at::opmath_type<scalar_t>* basis,
                    int64_t width, std::vector<double>& partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  int64_t max_g = 1;
  for (const LayerDesc& d : layers) max_g = std::max<int64_t>(max_g, d.G);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> lanes((max_g + 1) * cpu::kLanes);
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const LayerDesc& d = layers[ch.layer];
      Scratch<acc_t>& s = cpu::thread_scratch<acc_t>(d.G, false);
      const BatchTable<acc_t>& t = tables[ch.layer];
      with_class(d.G, t.is_signed, [&](auto k, auto sg) {
        cpu::chunk_forward<decltype(k)::value, decltype(sg)::value, ROWS, scalar_t, acc_t>(
            d, t, ch.first, ch.last, basis, s, lanes, partials.data() + c * width);
      });
    }
  });
}

template <typename scalar_t>
void gradient_layers(const std::vector<LayerDesc>& layers, const std::vector<Chunk>& chunks,
                     const std::vector<BatchTable<at::opmath_type<scalar_t>>>& tables, const std::vector<double>& two_pen,
                     const std::vector<double>& two_eq) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const LayerDesc& d = layers[ch.layer];
      Scratch<acc_t>& s = cpu::thread_scratch<acc_t>(d.G, true);
      const BatchTable<acc_t>& t = tables[ch.layer];
      // As before: 2 * grad in double, then rounded to acc_t.
      const acc_t tp = static_cast<acc_t>(two_pen[ch.layer]), te = static_cast<acc_t>(two_eq[ch.layer]);
      with_class(d.G, t.is_signed, [&](auto k, auto sg) {
        cpu::chunk_gradient<decltype(k)::value, decltype(sg)::value, scalar_t, acc_t>(d, t, ch.first, ch.last, tp, te, s);
      });
    }
  });
}

template <typename acc_t>
std::vector<BatchTable<acc_t>> make_tables(const std::vector<LayerDesc>& layers) {
  std::vector<BatchTable<acc_t>> out;
  out.reserve(layers.size());
  for (const LayerDesc& d : layers) out.push_back(cpu::make_table<acc_t>(d, true));
  return out;
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
  const int64_t G = t.G, width = G + 1;
  std::vector<LayerDesc> layers{describe(t, w, nullptr)};
  const std::vector<Chunk> chunks = cpu::plan_chunks(layers.data(), 1);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partials(n_chunks * width, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fused_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto tables = make_tables<acc_t>(layers);
    if (with_spectrum) {
      forward_layers<scalar_t, true>(layers, chunks, tables, basis_acc.const_data_ptr<acc_t>(), width, partials);
    } else {
      forward_layers<scalar_t, false>(layers, chunks, tables, nullptr, width, partials);
    }
  });

  // Chunk partials in chunk order: independent of the thread count.
  std::vector<double> total(width, 0.0);
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int64_t j = 0; j < (with_spectrum ? width : 2); ++j) total[j] += partials[c * width + j];

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

at::Tensor fused_backward_cpu(const at::Tensor& weight, const at::Tensor& grad_penalty, const at::Tensor& grad_eq,
                              const at::Tensor& offsets, const at::Tensor& inv_stab, int64_t c_out, int64_t c_in,
                              int64_t stride_out, int64_t stride_in, int64_t signed_offsets) {
  const OrbitArgs t = check_fused_backward(weight, grad_penalty, grad_eq, offsets, inv_stab, c_out, c_in, stride_out,
                                           stride_in, signed_offsets != 0);
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  // check_grad guarantees one value; read in place rather than through .item() (an op dispatch each).
  const std::vector<double> gp{2 * read_scalar(grad_penalty)}, ge{2 * read_scalar(grad_eq)};
  std::vector<LayerDesc> layers{describe(t, w, out.mutable_data_ptr())};
  const std::vector<Chunk> chunks = cpu::plan_chunks(layers.data(), 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fused_backward_cpu", [&] {
    gradient_layers<scalar_t>(layers, chunks, make_tables<at::opmath_type<scalar_t>>(layers), gp, ge);
  });
  return out;
}

// --- multi-tensor ops: every layer of one dtype in one pass -------------------------------------

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
  const int64_t L = static_cast<int64_t>(a.layers.size());
  const std::vector<Chunk> chunks = cpu::plan_chunks(a.layers.data(), L);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partials(2 * n_chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multi_forward_cpu", [&] {
    forward_layers<scalar_t, false>(a.layers, chunks, make_tables<at::opmath_type<scalar_t>>(a.layers), nullptr, 2,
                                    partials);
  });

  // Per-layer sums in double, in chunk order, written straight in the accumulation dtype.
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
  const int64_t L = static_cast<int64_t>(a.layers.size());
  std::vector<at::Tensor> out = multi_grad_outputs(a);
  // Read in place, strides honoured (an expanded total gradient has stride 0): no conversion ops.
  std::vector<double> gp = read_per_layer(grad_penalty, L), ge = read_per_layer(grad_eq, L);
  // As fused_backward: 2 * grad in double, then rounded to acc_t.
  for (int64_t l = 0; l < L; ++l) {
    gp[l] *= 2;
    ge[l] *= 2;
  }
  const std::vector<Chunk> chunks = cpu::plan_chunks(a.layers.data(), L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multi_backward_cpu", [&] {
    gradient_layers<scalar_t>(a.layers, chunks, make_tables<at::opmath_type<scalar_t>>(a.layers), gp, ge);
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
