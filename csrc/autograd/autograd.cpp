// Autograd of the public projkernels_C ops, registered for the Autograd key, so a forward and
// backward through the compiled backends never enters Python.  One family of autograd Functions
// (PenaltyEnergyNode, BackwardNode, ProjectNode, and SingleWeight's Autograd-key kernels, each
// written once as a template over the Kind) serves the single-weight ops of every symmetry kind: the
// finite groups' penalty_energy / penalty_energy_backward / project and the steerable_* ones, which
// share their math and differ only in the ops they call (the Kind).  The multi-tensor ops have
// their own pair.
//
// Each function runs its op below autograd (AutoDispatchBelowADInplaceOrView) in forward, and its
// backward calls public ops again through the dispatcher (public_ops.h): when the graph of the
// backward is being recorded (create_graph=True) those calls record their own nodes, which is what
// makes double backward work.  The gradients used:
//   penalty_energy:          dW = 2 g_pen (W - P W) + 2 g_eq P W                  (penalty_energy_backward)
//   penalty_energy_backward: linear in W with the self-adjoint map 2 g_pen (I - P) + 2 g_eq P, so its
//                            VJP on G is the same map of G; in (g_pen, g_eq) its VJP is
//                            (2 <G, W - P W>, 2 <G, P W>)
//   project:                 P is an orthogonal projector, so self-adjoint: the VJP is P(G)
//   multi_penalty:           per layer as penalty_energy, g_pen[l] = g_total_pen + g_per_layer_pen[l]
// An unused output's gradient stays undefined (materialize_grads off) and is replaced by the table's
// cached zero, so the backward creates no tensors of its own.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "op_checks.h"  // acc_type_of: the one accumulation rule on the C++ side
#include "public_ops.h"
#include "tables.h"

namespace projkernels {
namespace {

using at::IntArrayRef;
using at::Tensor;
using at::TensorList;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// True when an op's Autograd kernel must record a node: grad mode on and some input requiring
// grad.  Otherwise (inference, and every call made by a backward that does not build a graph) the
// op runs below autograd directly, without a context to fill.
//
// The ops implement reverse mode only: an input carrying a forward-mode tangent (a dual tensor of
// torch.autograd.forward_ad) is refused here, where the tangent would otherwise be dropped silently.
bool records(std::initializer_list<const Tensor*> tensors, TensorList lists = {}) {
  constexpr const char* no_forward_ad =
      "projkernels: an input carries a forward-mode tangent (torch.autograd.forward_ad); the penalty ops "
      "support reverse mode only (backward, torch.autograd.grad)";
  bool any = false;
  for (const Tensor* t : tensors) {
    if (!t->defined()) continue;
    TORCH_CHECK(!t->_fw_grad(/*level=*/0).defined(), no_forward_ad);
    any = any || t->requires_grad();
  }
  for (const Tensor& t : lists) {
    TORCH_CHECK(!t._fw_grad(/*level=*/0).defined(), no_forward_ad);
    any = any || t.requires_grad();
  }
  return any && at::GradMode::is_enabled();
}

// The gradients of a write op "2 g_pen (W - P W) + 2 g_eq P W" with respect to (g_pen, g_eq),
// given the incoming G and P W: 2 <G, W - P W> and 2 <G, P W>, in the accumulation dtype.
std::pair<Tensor, Tensor> coefficient_grads(const Tensor& G, const Tensor& weight, const Tensor& pw) {
  const auto acc = acc_type_of(weight.scalar_type());
  const Tensor g = G.to(acc), w = weight.to(acc), p = pw.to(acc);
  return {2 * (g * (w - p)).sum(), 2 * (g * p).sum()};
}

// --- single weight: one family for every symmetry kind ------------------------------------------

// A single-weight op's table and geometry as they travel to Function::apply: wrapped in a struct, so
// that autograd does not take the tables for inputs (they are constants: no edges, no input
// metadata, no gradient slots); kept in the context for the backward.
struct SingleTable {
  TensorList table;
  IntArrayRef geometry;
};

void save_table(AutogradContext* ctx, const SingleTable& t) {
  ctx->saved_data["table"] = t.table.vec();
  ctx->saved_data["geometry"] = t.geometry.vec();
}

std::pair<std::vector<Tensor>, std::vector<int64_t>> load_table(AutogradContext* ctx) {
  return {ctx->saved_data["table"].toTensorVector(), ctx->saved_data["geometry"].toIntVector()};
}

// The symmetry kinds: the public ops a kind's autograd calls, the prefix of their names, and where
// its table keeps the zero (read by name, tables.h).
struct FiniteGroup {
  static constexpr const char* kPrefix = "";
  static std::tuple<Tensor, Tensor> penalty_energy(const Tensor& w, TensorList t, IntArrayRef g) {
    return public_ops::penalty_energy(w, t, g);
  }
  static Tensor backward(const Tensor& w, const Tensor& gp, const Tensor& ge, TensorList t, IntArrayRef g) {
    return public_ops::penalty_energy_backward(w, gp, ge, t, g);
  }
  static Tensor project(const Tensor& w, TensorList t, IntArrayRef g) { return public_ops::project(w, t, g); }
  static const Tensor& zero(TensorList t, IntArrayRef g) { return orbit_table(t, g, "projkernels_C::penalty_energy").zero; }
};

struct Steerable {
  static constexpr const char* kPrefix = "steerable_";
  static std::tuple<Tensor, Tensor> penalty_energy(const Tensor& w, TensorList t, IntArrayRef g) {
    return public_ops::steerable_penalty_energy(w, t, g);
  }
  static Tensor backward(const Tensor& w, const Tensor& gp, const Tensor& ge, TensorList t, IntArrayRef g) {
    return public_ops::steerable_penalty_energy_backward(w, gp, ge, t, g);
  }
  static Tensor project(const Tensor& w, TensorList t, IntArrayRef g) { return public_ops::steerable_project(w, t, g); }
  static const Tensor& zero(TensorList t, IntArrayRef g) {
    return steer_table(t, g, "projkernels_C::steerable_penalty_energy").zero;
  }
};

// The three nodes of a single-weight op, written once for every kind.  Self is the named node
// (below), so that a graph shows which op recorded it (grad_fn.name()).
template <typename Kind, typename Self>
class BackwardNode : public torch::autograd::Function<Self> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& weight, const Tensor& grad_penalty,
                               const Tensor& grad_eq, const SingleTable& t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({weight, grad_penalty, grad_eq});
    save_table(ctx, t);
    return {Kind::backward(weight, grad_penalty, grad_eq, t.table, t.geometry)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &weight = saved[0], &gp = saved[1], &ge = saved[2];
    const auto [table, geometry] = load_table(ctx);
    variable_list out(4);
    const Tensor& G = grads[0];
    if (!G.defined()) return out;
    if (ctx->needs_input_grad(0)) out[0] = Kind::backward(G, gp, ge, table, geometry);
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      const auto [dgp, dge] = coefficient_grads(G, weight, Kind::project(weight, table, geometry));
      out[1] = dgp.to(gp.scalar_type()).reshape(gp.sizes());
      out[2] = dge.to(ge.scalar_type()).reshape(ge.sizes());
    }
    return out;
  }
};

template <typename Kind, typename Self>
class PenaltyEnergyNode : public torch::autograd::Function<Self> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& weight, const SingleTable& t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({weight});
    save_table(ctx, t);
    auto [pen, eq] = Kind::penalty_energy(weight, t.table, t.geometry);
    return {pen, eq};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(2);
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const auto [table, geometry] = load_table(ctx);
    const Tensor& zero = Kind::zero(table, geometry);  // an unused output's gradient
    const Tensor gp = grads[0].defined() ? grads[0] : zero;
    const Tensor ge = grads[1].defined() ? grads[1] : zero;
    // Through the dispatcher with autograd: records the kind's backward node under create_graph.
    out[0] = Kind::backward(ctx->get_saved_variables()[0], gp, ge, table, geometry);
    return out;
  }
};

template <typename Kind, typename Self>
class ProjectNode : public torch::autograd::Function<Self> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& weight, const SingleTable& t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_table(ctx, t);
    return {Kind::project(weight, t.table, t.geometry)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(2);
    if (grads[0].defined()) {
      const auto [table, geometry] = load_table(ctx);
      out[0] = Kind::project(grads[0], table, geometry);
    }
    return out;
  }
};

// The named nodes of each kind.
class PenaltyEnergyFn : public PenaltyEnergyNode<FiniteGroup, PenaltyEnergyFn> {};
class PenaltyEnergyBackwardFn : public BackwardNode<FiniteGroup, PenaltyEnergyBackwardFn> {};
class ProjectFn : public ProjectNode<FiniteGroup, ProjectFn> {};
class SteerPenaltyEnergyFn : public PenaltyEnergyNode<Steerable, SteerPenaltyEnergyFn> {};
class SteerBackwardFn : public BackwardNode<Steerable, SteerBackwardFn> {};
class SteerProjectFn : public ProjectNode<Steerable, SteerProjectFn> {};

// The Autograd-key kernels of a kind's three ops: below autograd when nothing records, else through
// the kind's nodes.
template <typename Kind, typename PenaltyEnergyFnT, typename BackwardFnT, typename ProjectFnT>
struct SingleWeight {
  static std::tuple<Tensor, Tensor> penalty_energy(const Tensor& weight, TensorList table, IntArrayRef geometry) {
    if (!records({&weight})) {
      at::AutoDispatchBelowADInplaceOrView guard;
      return Kind::penalty_energy(weight, table, geometry);
    }
    auto r = PenaltyEnergyFnT::apply(weight, SingleTable{table, geometry});
    return {r[0], r[1]};
  }

  static Tensor penalty_energy_backward(const Tensor& weight, const Tensor& gp, const Tensor& ge, TensorList table,
                                        IntArrayRef geometry) {
    if (!records({&weight, &gp, &ge})) {
      at::AutoDispatchBelowADInplaceOrView guard;
      return Kind::backward(weight, gp, ge, table, geometry);
    }
    return BackwardFnT::apply(weight, gp, ge, SingleTable{table, geometry})[0];
  }

  static Tensor project(const Tensor& weight, TensorList table, IntArrayRef geometry) {
    if (!records({&weight})) {
      at::AutoDispatchBelowADInplaceOrView guard;
      return Kind::project(weight, table, geometry);
    }
    return ProjectFnT::apply(weight, SingleTable{table, geometry})[0];
  }

  static void register_kernels(torch::Library& m) {
    const std::string p = Kind::kPrefix;
    m.impl((p + "penalty_energy").c_str(), &SingleWeight::penalty_energy);
    m.impl((p + "penalty_energy_backward").c_str(), &SingleWeight::penalty_energy_backward);
    m.impl((p + "project").c_str(), &SingleWeight::project);
  }
};

using FiniteGroupAutograd = SingleWeight<FiniteGroup, PenaltyEnergyFn, PenaltyEnergyBackwardFn, ProjectFn>;
using SteerableAutograd = SingleWeight<Steerable, SteerPenaltyEnergyFn, SteerBackwardFn, SteerProjectFn>;

Tensor spectrum_autograd(const Tensor& weight, TensorList table, IntArrayRef geometry) {
  // A report, not a training quantity: computed below autograd, its result carries no gradient.
  at::AutoDispatchBelowADInplaceOrView guard;
  return public_ops::spectrum(weight, table, geometry);
}

// --- multi-tensor -------------------------------------------------------------------------------

// The multi-tensor tables travel to Function::apply wrapped in this struct, as a single weight's do
// in SingleTable (above), so that autograd does not take them for inputs.
struct MultiTableArgs {
  TensorList offsets, inv_stab;
  const Tensor& consts;
  IntArrayRef geometry;
};

struct MultiSaved {
  std::vector<Tensor> offsets, inv_stab;
  Tensor consts;
  std::vector<int64_t> geometry;
};

void save_multi(AutogradContext* ctx, const MultiTableArgs& m) {
  ctx->saved_data["offsets"] = m.offsets.vec();
  ctx->saved_data["inv_stab"] = m.inv_stab.vec();
  ctx->saved_data["consts"] = m.consts;
  ctx->saved_data["geometry"] = m.geometry.vec();
}

MultiSaved load_multi(AutogradContext* ctx) {
  return {ctx->saved_data["offsets"].toTensorVector(), ctx->saved_data["inv_stab"].toTensorVector(),
          ctx->saved_data["consts"].toTensor(), ctx->saved_data["geometry"].toIntVector()};
}

class MultiPenaltyBackwardFn : public torch::autograd::Function<MultiPenaltyBackwardFn> {
 public:
  static variable_list forward(AutogradContext* ctx, TensorList weights, const Tensor& grad_penalty,
                               const Tensor& grad_eq, const MultiTableArgs& m) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<Tensor> keep = weights.vec();
    keep.push_back(grad_penalty);
    keep.push_back(grad_eq);
    ctx->save_for_backward(keep);
    save_multi(ctx, m);
    return public_ops::multi_penalty_backward(weights, grad_penalty, grad_eq, m.offsets, m.inv_stab, m.consts,
                                              m.geometry);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const size_t L = saved.size() - 2;
    const Tensor gp = saved[L], ge = saved[L + 1];
    std::vector<Tensor> weights(saved.begin(), saved.begin() + L);
    const MultiSaved m = load_multi(ctx);
    variable_list out(L + 3);
    std::vector<Tensor> G(L);
    bool any = false;
    for (size_t l = 0; l < L; ++l) {
      any = any || grads[l].defined();
      G[l] = grads[l].defined() ? grads[l] : at::zeros_like(weights[l]);
    }
    if (!any) return out;
    bool need_w = false;
    for (size_t l = 0; l < L; ++l) need_w = need_w || ctx->needs_input_grad(l);
    if (need_w) {
      auto gw = public_ops::multi_penalty_backward(G, gp, ge, m.offsets, m.inv_stab, m.consts, m.geometry);
      for (size_t l = 0; l < L; ++l)
        if (ctx->needs_input_grad(l)) out[l] = gw[l];
    }
    if (ctx->needs_input_grad(L) || ctx->needs_input_grad(L + 1)) {
      auto pw = public_ops::multi_penalty_backward(weights, m.consts[0], m.consts[1], m.offsets, m.inv_stab, m.consts,
                                                   m.geometry);
      std::vector<Tensor> dgp(L), dge(L);
      for (size_t l = 0; l < L; ++l) std::tie(dgp[l], dge[l]) = coefficient_grads(G[l], weights[l], pw[l]);
      out[L] = at::stack(dgp).to(gp.scalar_type());
      out[L + 1] = at::stack(dge).to(ge.scalar_type());
    }
    return out;
  }
};

class MultiPenaltyFn : public torch::autograd::Function<MultiPenaltyFn> {
 public:
  static variable_list forward(AutogradContext* ctx, TensorList weights, const MultiTableArgs& m) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(weights.vec());
    save_multi(ctx, m);
    auto [tp, te, pen, eq] = public_ops::multi_penalty(weights, m.offsets, m.inv_stab, m.consts, m.geometry);
    return {tp, te, pen, eq};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto weights = ctx->get_saved_variables();
    const size_t L = weights.size();
    variable_list out(L + 1);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined() && !grads[3].defined()) return out;
    const MultiSaved m = load_multi(ctx);
    // Layer l's coefficient: the total's gradient plus its own entry's; expand is a view, not a copy.
    auto coefficient = [&](const Tensor& total, const Tensor& per_layer) -> Tensor {
      if (total.defined() && per_layer.defined()) return per_layer + total;
      if (total.defined()) return total.expand({static_cast<int64_t>(L)});
      if (per_layer.defined()) return per_layer;
      return m.consts[0];  // zeros
    };
    const Tensor gp = coefficient(grads[0], grads[2]), ge = coefficient(grads[1], grads[3]);
    auto dw = public_ops::multi_penalty_backward(weights, gp, ge, m.offsets, m.inv_stab, m.consts, m.geometry);
    for (size_t l = 0; l < L; ++l) out[l] = dw[l];
    return out;
  }
};

// --- multi-tensor Autograd-key kernels ---

std::tuple<Tensor, Tensor, Tensor, Tensor> multi_penalty_autograd(TensorList weights, TensorList offsets,
                                                                  TensorList inv_stab, const Tensor& consts,
                                                                  IntArrayRef geometry) {
  if (!records({}, weights)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return public_ops::multi_penalty(weights, offsets, inv_stab, consts, geometry);
  }
  auto r = MultiPenaltyFn::apply(weights, MultiTableArgs{offsets, inv_stab, consts, geometry});
  return {r[0], r[1], r[2], r[3]};
}

std::vector<Tensor> multi_penalty_backward_autograd(TensorList weights, const Tensor& grad_penalty,
                                                    const Tensor& grad_eq, TensorList offsets, TensorList inv_stab,
                                                    const Tensor& consts, IntArrayRef geometry) {
  if (!records({&grad_penalty, &grad_eq}, weights)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return public_ops::multi_penalty_backward(weights, grad_penalty, grad_eq, offsets, inv_stab, consts, geometry);
  }
  return MultiPenaltyBackwardFn::apply(weights, grad_penalty, grad_eq,
                                       MultiTableArgs{offsets, inv_stab, consts, geometry});
}

}  // namespace
}  // namespace projkernels

TORCH_LIBRARY_IMPL(projkernels_C, Autograd, m) {
  projkernels::FiniteGroupAutograd::register_kernels(m);
  projkernels::SteerableAutograd::register_kernels(m);
  m.impl("spectrum", &projkernels::spectrum_autograd);
  m.impl("multi_penalty", &projkernels::multi_penalty_autograd);
  m.impl("multi_penalty_backward", &projkernels::multi_penalty_backward_autograd);
}
