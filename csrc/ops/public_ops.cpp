// Schemas and device kernels of the public projkernels_C ops (see public_ops.h for the argument
// layout).  The kernels registered here for CPU and CUDA are thin: they check the argument counts
// (cheap invariants only; the table contents were validated once when the table was built) and call
// the raw op of the same device.  Autograd lives in autograd.cpp; fake kernels for torch.compile
// are registered from Python (projkernels/native.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "op_common.h"  // op_handle
#include "public_ops.h"

namespace projkernels {
namespace public_ops {
namespace {

using at::Tensor;
using at::TensorList;
using at::IntArrayRef;

// --- handles of the ops, looked up once ----------------------------------------------------------

using FusedForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, int64_t, int64_t,
                                                           int64_t, int64_t, int64_t, bool);
using FusedBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                int64_t, int64_t, int64_t, int64_t);
using MultiForwardSig = std::tuple<Tensor, Tensor>(TensorList, TensorList, TensorList, IntArrayRef);
using MultiBackwardSig = std::vector<Tensor>(TensorList, const Tensor&, const Tensor&, TensorList, TensorList,
                                             IntArrayRef);

const c10::TypedOperatorHandle<FusedForwardSig>& fused_forward_op() {
  static const auto h = op_handle<FusedForwardSig>("projkernels_C::fused_forward");
  return h;
}
const c10::TypedOperatorHandle<FusedBackwardSig>& fused_backward_op() {
  static const auto h = op_handle<FusedBackwardSig>("projkernels_C::fused_backward");
  return h;
}
const c10::TypedOperatorHandle<MultiForwardSig>& multi_forward_op() {
  static const auto h = op_handle<MultiForwardSig>("projkernels_C::multi_forward");
  return h;
}
const c10::TypedOperatorHandle<MultiBackwardSig>& multi_backward_op() {
  static const auto h = op_handle<MultiBackwardSig>("projkernels_C::multi_backward");
  return h;
}

void check_single(TensorList table, IntArrayRef geometry, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(table.size()) == kTableSize, op,
              ": table must be [offsets, inv_stab, basis, row_irrep, zero, half], got ", table.size(), " tensors");
  TORCH_CHECK(static_cast<int64_t>(geometry.size()) == kGeometrySize, op,
              ": geometry must be [n_irreps, c_out, c_in, stride_out, stride_in], got ", geometry.size(), " ints");
}

void check_consts(TensorList weights, const Tensor& consts, const char* op) {
  TORCH_CHECK(consts.dim() == 2 && consts.size(0) == 2 && consts.size(1) == static_cast<int64_t>(weights.size()),
              op, ": consts must have shape [2, ", weights.size(), "] (zeros, halves), got ", consts.sizes());
}

// The sum over layers.  On the CPU a loop over L values, in layer order, without dispatching an op;
// on a device, one reduction.
Tensor total(const Tensor& per_layer) {
  if (!per_layer.device().is_cpu()) return per_layer.sum();
  Tensor out = at::empty({}, per_layer.options());
  AT_DISPATCH_FLOATING_TYPES(per_layer.scalar_type(), "multi_penalty_total", [&] {
    const scalar_t* p = per_layer.const_data_ptr<scalar_t>();
    scalar_t acc = 0;
    for (int64_t l = 0; l < per_layer.numel(); ++l) acc += p[l];
    *out.mutable_data_ptr<scalar_t>() = acc;
  });
  return out;
}

// --- device kernels (registered for CPU and CUDA) -----------------------------------------------

std::tuple<Tensor, Tensor> penalty_energy_kernel(const Tensor& weight, TensorList table, IntArrayRef g) {
  check_single(table, g, "projkernels_C::penalty_energy");
  auto out = fused_forward_op().call(weight, table[0], table[1], table[2], table[3], g[0], g[1], g[2], g[3], g[4],
                                     /*with_spectrum=*/false);
  return {std::move(std::get<0>(out)), std::move(std::get<1>(out))};
}

Tensor penalty_energy_backward_kernel(const Tensor& weight, const Tensor& grad_penalty, const Tensor& grad_eq,
                                      TensorList table, IntArrayRef g) {
  check_single(table, g, "projkernels_C::penalty_energy_backward");
  return fused_backward_op().call(weight, grad_penalty, grad_eq, table[0], table[1], g[1], g[2], g[3], g[4]);
}

Tensor project_kernel(const Tensor& weight, TensorList table, IntArrayRef g) {
  check_single(table, g, "projkernels_C::project");
  // P(W) is the backward with grad_pen = 0 and grad_eq = 1/2.
  return fused_backward_op().call(weight, table[4], table[5], table[0], table[1], g[1], g[2], g[3], g[4]);
}

Tensor spectrum_kernel(const Tensor& weight, TensorList table, IntArrayRef g) {
  check_single(table, g, "projkernels_C::spectrum");
  return std::get<2>(fused_forward_op().call(weight, table[0], table[1], table[2], table[3], g[0], g[1], g[2], g[3],
                                              g[4], /*with_spectrum=*/true));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> multi_penalty_kernel(TensorList weights, TensorList offsets,
                                                                TensorList inv_stab, const Tensor& consts,
                                                                IntArrayRef geometry) {
  check_consts(weights, consts, "projkernels_C::multi_penalty");
  auto [pen, eq] = multi_forward_op().call(weights, offsets, inv_stab, geometry);
  return {total(pen), total(eq), pen, eq};
}

std::vector<Tensor> multi_penalty_backward_kernel(TensorList weights, const Tensor& grad_penalty,
                                                  const Tensor& grad_eq, TensorList offsets, TensorList inv_stab,
                                                  const Tensor& consts, IntArrayRef geometry) {
  check_consts(weights, consts, "projkernels_C::multi_penalty_backward");
  return multi_backward_op().call(weights, grad_penalty, grad_eq, offsets, inv_stab, geometry);
}

// --- dispatcher calls used by autograd.cpp ------------------------------------------------------

using PESig = std::tuple<Tensor, Tensor>(const Tensor&, TensorList, IntArrayRef);
using PEBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, TensorList, IntArrayRef);
using ProjectSig = Tensor(const Tensor&, TensorList, IntArrayRef);
using MultiPenaltySig = std::tuple<Tensor, Tensor, Tensor, Tensor>(TensorList, TensorList, TensorList, const Tensor&,
                                                                   IntArrayRef);
using MultiPenaltyBackwardSig = std::vector<Tensor>(TensorList, const Tensor&, const Tensor&, TensorList, TensorList,
                                                    const Tensor&, IntArrayRef);

}  // namespace

std::tuple<Tensor, Tensor> penalty_energy(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  static const auto h = op_handle<PESig>("projkernels_C::penalty_energy");
  return h.call(weight, table, geometry);
}

Tensor penalty_energy_backward(const Tensor& weight, const Tensor& grad_penalty, const Tensor& grad_eq,
                               TensorList table, IntArrayRef geometry) {
  static const auto h = op_handle<PEBackwardSig>("projkernels_C::penalty_energy_backward");
  return h.call(weight, grad_penalty, grad_eq, table, geometry);
}

Tensor project(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  static const auto h = op_handle<ProjectSig>("projkernels_C::project");
  return h.call(weight, table, geometry);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> multi_penalty(TensorList weights, TensorList offsets, TensorList inv_stab,
                                                         const Tensor& consts, IntArrayRef geometry) {
  static const auto h = op_handle<MultiPenaltySig>("projkernels_C::multi_penalty");
  return h.call(weights, offsets, inv_stab, consts, geometry);
}

std::vector<Tensor> multi_penalty_backward(TensorList weights, const Tensor& grad_penalty, const Tensor& grad_eq,
                                           TensorList offsets, TensorList inv_stab, const Tensor& consts,
                                           IntArrayRef geometry) {
  static const auto h = op_handle<MultiPenaltyBackwardSig>("projkernels_C::multi_penalty_backward");
  return h.call(weights, grad_penalty, grad_eq, offsets, inv_stab, consts, geometry);
}

}  // namespace public_ops
}  // namespace projkernels

TORCH_LIBRARY_FRAGMENT(projkernels_C, m) {
  // (penalty, eq_energy), 0-dim, in the accumulation dtype (float64 for float64 weights, else float32).
  m.def("penalty_energy(Tensor weight, Tensor[] table, int[] geometry) -> (Tensor, Tensor)");
  // 2 grad_penalty (W - P W) + 2 grad_eq P W in the weight's dtype; grad_* are 0-dim.
  m.def(
      "penalty_energy_backward(Tensor weight, Tensor grad_penalty, Tensor grad_eq, Tensor[] table, int[] geometry) "
      "-> Tensor");
  // P(W) in the weight's dtype.
  m.def("project(Tensor weight, Tensor[] table, int[] geometry) -> Tensor");
  // Isotypic energies [n_irreps] in the accumulation dtype; not differentiable.
  m.def("spectrum(Tensor weight, Tensor[] table, int[] geometry) -> Tensor");
  // (total penalty, total eq_energy, per-layer penalty [L], per-layer eq_energy [L]) of weights of one dtype.
  m.def(
      "multi_penalty(Tensor[] weights, Tensor[] offsets, Tensor[] inv_stab, Tensor consts, int[] geometry) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Every layer's 2 grad_penalty[l] (W_l - P W_l) + 2 grad_eq[l] P W_l, in the weights' dtype.
  m.def(
      "multi_penalty_backward(Tensor[] weights, Tensor grad_penalty, Tensor grad_eq, Tensor[] offsets, "
      "Tensor[] inv_stab, Tensor consts, int[] geometry) -> Tensor[]");
}

// The same thin kernels serve both devices: the raw op they call is dispatched to the device's kernel.
#define PROJKERNELS_REGISTER_PUBLIC(m)                                                  \
  m.impl("penalty_energy", &projkernels::public_ops::penalty_energy_kernel);            \
  m.impl("penalty_energy_backward", &projkernels::public_ops::penalty_energy_backward_kernel); \
  m.impl("project", &projkernels::public_ops::project_kernel);                          \
  m.impl("spectrum", &projkernels::public_ops::spectrum_kernel);                        \
  m.impl("multi_penalty", &projkernels::public_ops::multi_penalty_kernel);              \
  m.impl("multi_penalty_backward", &projkernels::public_ops::multi_penalty_backward_kernel);

TORCH_LIBRARY_IMPL(projkernels_C, CPU, m) { PROJKERNELS_REGISTER_PUBLIC(m) }

TORCH_LIBRARY_IMPL(projkernels_C, CUDA, m) { PROJKERNELS_REGISTER_PUBLIC(m) }
