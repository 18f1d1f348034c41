// The public projkernels_C ops (schemas in schemas.cpp): their device kernels, and their calls
// through the dispatcher (public_ops.h).  The kernels registered here for CPU and CUDA are thin:
// they read the table by name (tables.h; cheap invariants only, the table contents were validated
// once when the table was built) and call the raw op of the same device.  Autograd lives in
// autograd/autograd.cpp; fake kernels for torch.compile are registered from Python
// (projkernels/library/fakes.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "op_common.h"  // op_handle
#include "public_ops.h"
#include "tables.h"

namespace projkernels {
namespace public_ops {
namespace {

using at::Tensor;
using at::TensorList;
using at::IntArrayRef;

// --- handles of the ops, looked up once ----------------------------------------------------------

using FusedForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, int64_t, int64_t,
                                                           int64_t, int64_t, int64_t, int64_t, bool);
using FusedBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                int64_t, int64_t, int64_t, int64_t, int64_t);
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

std::tuple<Tensor, Tensor> penalty_energy_kernel(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  const OrbitTableRef t = orbit_table(table, geometry, "projkernels_C::penalty_energy");
  auto out = fused_forward_op().call(weight, t.offsets, t.inv_stab, t.basis, t.row_irrep, t.n_irreps, t.c_out, t.c_in,
                                     t.stride_out, t.stride_in, t.signed_offsets, /*with_spectrum=*/false);
  return {std::move(std::get<0>(out)), std::move(std::get<1>(out))};
}

Tensor penalty_energy_backward_kernel(const Tensor& weight, const Tensor& grad_penalty, const Tensor& grad_eq,
                                      TensorList table, IntArrayRef geometry) {
  const OrbitTableRef t = orbit_table(table, geometry, "projkernels_C::penalty_energy_backward");
  return fused_backward_op().call(weight, grad_penalty, grad_eq, t.offsets, t.inv_stab, t.c_out, t.c_in, t.stride_out,
                                  t.stride_in, t.signed_offsets);
}

Tensor project_kernel(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  const OrbitTableRef t = orbit_table(table, geometry, "projkernels_C::project");
  // P(W) is the backward with grad_pen = 0 and grad_eq = 1/2.
  return fused_backward_op().call(weight, t.zero, t.half, t.offsets, t.inv_stab, t.c_out, t.c_in, t.stride_out,
                                  t.stride_in, t.signed_offsets);
}

Tensor spectrum_kernel(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  const OrbitTableRef t = orbit_table(table, geometry, "projkernels_C::spectrum");
  return std::get<2>(fused_forward_op().call(weight, t.offsets, t.inv_stab, t.basis, t.row_irrep, t.n_irreps, t.c_out,
                                              t.c_in, t.stride_out, t.stride_in, t.signed_offsets,
                                              /*with_spectrum=*/true));
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

// --- signatures of the public ops, for their calls through the dispatcher ----------------------

using PESig = std::tuple<Tensor, Tensor>(const Tensor&, TensorList, IntArrayRef);
using PEBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, TensorList, IntArrayRef);
using WeightOutSig = Tensor(const Tensor&, TensorList, IntArrayRef);
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
  static const auto h = op_handle<WeightOutSig>("projkernels_C::project");
  return h.call(weight, table, geometry);
}

Tensor spectrum(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  static const auto h = op_handle<WeightOutSig>("projkernels_C::spectrum");
  return h.call(weight, table, geometry);
}

std::tuple<Tensor, Tensor> steerable_penalty_energy(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  static const auto h = op_handle<PESig>("projkernels_C::steerable_penalty_energy");
  return h.call(weight, table, geometry);
}

Tensor steerable_penalty_energy_backward(const Tensor& weight, const Tensor& grad_penalty, const Tensor& grad_eq,
                                         TensorList table, IntArrayRef geometry) {
  static const auto h = op_handle<PEBackwardSig>("projkernels_C::steerable_penalty_energy_backward");
  return h.call(weight, grad_penalty, grad_eq, table, geometry);
}

Tensor steerable_project(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  static const auto h = op_handle<WeightOutSig>("projkernels_C::steerable_project");
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
