// Small helpers shared by the translation units of the projkernels_C ops: the finite-group ops
// (ops.cpp, public_ops.cpp, autograd.cpp) and the steerable ones (steerable_ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <initializer_list>
#include <utility>
#include <vector>

#include "op_checks.h"  // acc_type_of

namespace projkernels {

// A one-value tensor's value, read in place (the CPU kernels' gradient coefficients): no .item(),
// which would dispatch an op.
inline double read_scalar(const at::Tensor& g) {
  double v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "read_scalar",
                                  [&] { v = static_cast<double>(*g.const_data_ptr<scalar_t>()); });
  return v;
}

// The typed handle of an op of the library, for calls through the dispatcher (looked up once by
// the callers, which keep it in a function-local static).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// True when an op's Autograd kernel must record a node: grad mode on and some input requiring
// grad.  Otherwise (inference, and every call made by a backward that does not build a graph) the
// op runs below autograd directly, without a context to fill.
//
// The ops implement reverse mode only: an input carrying a forward-mode tangent (a dual tensor of
// torch.autograd.forward_ad) is refused here, where the tangent would otherwise be dropped silently.
inline bool records(std::initializer_list<const at::Tensor*> tensors, at::TensorList lists = {}) {
  constexpr const char* no_forward_ad =
      "projkernels: an input carries a forward-mode tangent (torch.autograd.forward_ad); the penalty ops "
      "support reverse mode only (backward, torch.autograd.grad)";
  bool any = false;
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    TORCH_CHECK(!t->_fw_grad(/*level=*/0).defined(), no_forward_ad);
    any = any || t->requires_grad();
  }
  for (const at::Tensor& t : lists) {
    TORCH_CHECK(!t._fw_grad(/*level=*/0).defined(), no_forward_ad);
    any = any || t.requires_grad();
  }
  return any && at::GradMode::is_enabled();
}

// The gradients of a write op "2 g_pen (W - P W) + 2 g_eq P W" with respect to (g_pen, g_eq),
// given the incoming G and P W: 2 <G, W - P W> and 2 <G, P W>, in the accumulation dtype.
inline std::pair<at::Tensor, at::Tensor> coefficient_grads(const at::Tensor& G, const at::Tensor& weight,
                                                           const at::Tensor& pw) {
  const auto acc = acc_type_of(weight.scalar_type());
  const at::Tensor g = G.to(acc), w = weight.to(acc), p = pw.to(acc);
  return {2 * (g * (w - p)).sum(), 2 * (g * p).sum()};
}

// A single-weight op's table and geometry as they travel to Function::apply: wrapped in a struct, so
// that autograd does not take the tables for inputs (they are constants: no edges, no input
// metadata, no gradient slots); kept in the context for the backward.
struct SingleTable {
  at::TensorList table;
  at::IntArrayRef geometry;
};

inline void save_table(torch::autograd::AutogradContext* ctx, const SingleTable& t) {
  ctx->saved_data["table"] = t.table.vec();
  ctx->saved_data["geometry"] = t.geometry.vec();
}

inline std::pair<std::vector<at::Tensor>, std::vector<int64_t>> load_table(torch::autograd::AutogradContext* ctx) {
  return {ctx->saved_data["table"].toTensorVector(), ctx->saved_data["geometry"].toIntVector()};
}

}  // namespace projkernels
