"""Model-level API: attach a group symmetry to layers, penalise, project and report.

A symmetry ``(group, in_rep, out_rep)`` is stored on the layer itself (attribute
``_projkernels_symmetry``), so it follows the module through ``copy.deepcopy``, ``model.to(...)``
and wrapping in bigger models, and it never enters the ``state_dict``.  Supported layers are
``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (and subclasses) with ``groups=1``; the
group must act on the layer's kernel (C<N> / D<N> on 1-D and 2-D kernels, O / Oh / T on 3-D ones,
any group on kernel-free layers: Linear and 1x1 convs).

Biases.  For a layer whose output fields are ``regular``, the bias is equivariant exactly when
it is constant on each field; for ``trivial`` output fields every bias is equivariant.  So the
bias's projection is the mean over each regular field, and its non-equivariance is the squared
deviation from that mean.  ``model_penalty`` adds that deviation to the ``lambda_perp`` term and
``project_`` replaces the bias with its field means, both by default (``bias=False`` turns it off).
``lambda_G`` acts on weights only: like weight decay, it is rarely wanted on biases.

For a layer with a steerable symmetry the equivariant biases are those that lie, on every output
field, in the trivial-isotypic subspace of the field's representation (escnn's own biases live
there); the projection and its residual come from projkernels/symmetry/bias.py and join the same
terms (a field with no trivial irrep has its whole bias penalised).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import distributed as D
from .api import penalty_and_energy, project, spectrum
from .backends.registry import ON_CHANGE, check_backend_name
from .dispatch.multi import multi_penalty, plan_for
from .dispatch.multi_inputs import collect
from .groups import get_group, group_name_for_ops, short_repr as _short
from .symmetry import kind_of
from .symmetry.finite import SUPPORTED_LAYERS, field_deviation_sq as _field_deviation_sq

__all__ = ["Symmetry", "attach_symmetry", "detach_symmetry", "get_symmetry", "attach_symmetries",
           "attach_regular_gcnn", "attached_layers", "model_penalty", "project_", "equivariance_report",
           "format_report", "SUPPORTED_LAYERS"]

_ATTR = "_projkernels_symmetry"


@dataclass(frozen=True)
class Symmetry:
    """How ``group`` acts on a layer: channel representations on the input and output side."""
    group: str
    in_rep: str = "trivial"
    out_rep: str = "trivial"
    backend: str = "auto"

    def __str__(self) -> str:
        return f"{self.group} {self.in_rep}->{self.out_rep}"


SymmetryLike = Union[Symmetry, str, Tuple, Dict, None]


def _as_symmetry(spec: SymmetryLike) -> Optional[Symmetry]:
    if spec is None or isinstance(spec, Symmetry):
        return spec
    if isinstance(spec, str):
        return Symmetry(spec)
    if isinstance(spec, tuple):
        # (group, in_rep) would silently mean out_rep="trivial": both sides must be said.
        if len(spec) not in (3, 4):
            raise ValueError("rule: a tuple must be (group, in_rep, out_rep) or (group, in_rep, out_rep, "
                             f"backend); got {len(spec)} entries {_short(spec)}")
        return Symmetry(*spec)
    if isinstance(spec, dict):
        unknown = set(spec) - {"group", "in_rep", "out_rep", "backend"}
        if unknown or "group" not in spec:
            raise ValueError("rule: a dict must have the key 'group' and may have 'in_rep', 'out_rep', "
                             f"'backend'; got keys {_short(sorted(map(str, spec)))}")
        return Symmetry(**spec)
    raise TypeError("rule: expected the rule to return None, a Symmetry, a group name, a tuple "
                    f"(group, in_rep, out_rep) or a dict of those keys; got {type(spec).__name__}")


def _check_model(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        hint = (" (put the layers in an nn.ModuleList or nn.Sequential, or pass (weight, group, in_rep, "
                "out_rep) tuples to multi_penalty)" if isinstance(model, (list, tuple)) else "")
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}{hint}")
    return model


def _check_lambda(name: str, value) -> float:
    """A penalty weight: a finite non-negative number (a negative one would reward non-equivariance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
            value = float(value)
        else:
            raise TypeError(f"{name}: expected a non-negative number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite non-negative number, got {value}")
    return value


def _layer_label(module, name: Optional[str]) -> str:
    """How errors name a layer: its module path when known, always its type and weight shape."""
    weight = getattr(module, "weight", None)
    shape = f" {'x'.join(map(str, weight.shape))}" if isinstance(weight, torch.Tensor) else ""
    what = f"{type(module).__name__}{shape}"
    if name is None:
        return f"layer ({what})"
    return f"layer {name or '(model)'!r} ({what})"


def _name_layer(err: Exception, module, name: Optional[str]) -> Exception:
    # Same exception type, message prefixed with the layer, so callers' except clauses still match.
    return type(err)(f"{_layer_label(module, name)}: {err}")


def attach_symmetry(module: nn.Module, group="C4", in_rep: str = "trivial", out_rep: str = "trivial", *,
                    backend: str = "auto", name: Optional[str] = None) -> Symmetry:
    """Declare that ``group`` acts on ``module``'s input and output channels by ``in_rep`` / ``out_rep``.

    Validates now against the weight's shape (field sizes, group against kernel; see docs/design.md,
    Conventions), so a wrong declaration fails here and not in the middle of training.  Errors are
    ``TypeError`` / ``ValueError`` whose message starts with the layer: ``name`` (its module path,
    which ``attach_symmetries`` and ``attach_regular_gcnn`` pass), its type and weight shape.
    Returns the stored Symmetry.
    """
    try:
        kind = kind_of(group)
        check_backend_name(backend, kind.slot)  # a misspelt backend fails here, not at the first penalty
        group, in_rep, out_rep = kind.attach(module, group, in_rep, out_rep)
        sym = Symmetry(group, in_rep, out_rep, backend)
    except (TypeError, ValueError) as err:
        raise _name_layer(err, module, name) from None
    setattr(module, _ATTR, sym)
    return sym


def detach_symmetry(module: nn.Module) -> None:
    if hasattr(module, _ATTR):
        delattr(module, _ATTR)


def get_symmetry(module: nn.Module) -> Optional[Symmetry]:
    return getattr(module, _ATTR, None)


def attach_symmetries(model: nn.Module, rule: Callable[[str, nn.Module], SymmetryLike]) -> Dict[str, Symmetry]:
    """Call ``rule(name, layer)`` for every supported layer of ``model`` (module order) and attach
    what it returns (None skips the layer).  Returns ``{name: Symmetry}`` of the attached layers.
    An invalid declaration raises at once, naming the layer by its module path."""
    attached = {}
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_LAYERS):
            continue
        spec = rule(name, module)
        try:
            sym = _as_symmetry(spec)
        except (TypeError, ValueError) as err:
            raise _name_layer(err, module, name) from None
        if sym is None:
            continue
        attached[name] = attach_symmetry(module, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend,
                                         name=name)
    return attached


def attach_regular_gcnn(model: nn.Module, group="C4", *, first_in: str = "trivial", last_out: str = "regular",
                        layer_types: Sequence[type] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)) -> Dict[str, Symmetry]:
    """The common G-CNN layout: every conv (in module order) is regular -> regular, except that the
    first takes ``first_in`` fields (the image's trivial channels) and the last gives ``last_out``
    (``"trivial"`` for an invariant / scalar-field head).  Errors name the offending layer.  For a
    3-D CNN pass a cube group (``"O"``, ``"Oh"``, ``"T"``): its regular fields are |G| channels in
    escnn's element order."""
    group = get_group(group_name_for_ops(group)).name  # a bad group fails once, before any layer
    layers = [name for name, m in model.named_modules() if isinstance(m, tuple(layer_types))]
    if not layers:
        raise ValueError("model: no layer of the types "
                         f"{[t.__name__ for t in layer_types]} found to attach a symmetry to")
    first, last = layers[0], layers[-1]

    def rule(name, module):
        if name not in layers:
            return None
        return Symmetry(group, first_in if name == first else "regular", last_out if name == last else "regular")
    return attach_symmetries(model, rule)


def attached_layers(model: nn.Module) -> List[Tuple[str, nn.Module, Symmetry]]:
    """``(name, layer, Symmetry)`` for every layer of ``model`` with a symmetry, in module order."""
    return [(name, m, getattr(m, _ATTR)) for name, m in model.named_modules() if hasattr(m, _ATTR)]


# --- penalties -------------------------------------------------------------------------------

def _bias_deviation_sq(bias: Optional[torch.Tensor], sym: Symmetry, name: str = "bias") -> Optional[torch.Tensor]:
    """||b - P(b)||^2 of one layer's bias under ``sym``; None when there is no bias or P is the identity
    (trivial output fields of a finite group)."""
    if bias is None:
        return None
    return kind_of(sym.group).bias_deviation_sq(bias, sym.group, sym.out_rep, name)


@torch.no_grad()
def project_bias_(vector: Optional[torch.Tensor], sym: Symmetry) -> None:
    """In place: replace a layer's bias (or the bias's gradient) by its projection under ``sym``: the
    mean over each regular output field, or for a steerable symmetry each output field's
    trivial-isotypic part.  Trivial output fields of a finite group: nothing to do (every bias is
    equivariant)."""
    if vector is None:
        return
    p = kind_of(sym.group).project_bias(vector, sym.group, sym.out_rep)
    if p is not None:
        vector.copy_(p)


def _check_layers(layers) -> None:
    """Each attached layer's current weight against its symmetry, errors naming the layer (a weight
    replaced after attach_symmetry may no longer fit the declaration)."""
    for name, module, sym in layers:
        try:
            kind_of(sym.group).check_layer(module, sym.group, sym.in_rep, sym.out_rep)
        except (TypeError, ValueError) as err:
            raise _name_layer(err, module, name) from None


class _ModelPlan:
    """What ``model_penalty`` needs of one model, built once and reused while the model is unchanged.

    Holds weak references only, to the model's supported layers (to notice a symmetry attached or
    detached), to its containers (to notice a layer removed) and to the attached layers, so that
    the cache never keeps a model alive (a bare layer is its own model: a strong reference from its
    plan would pin it through the cache for good).  Beside them: the signature (type, shape, dtype,
    device) of the attached layers' weights and biases, and one multi-tensor plan per backend named
    in the symmetries (device tables included; those are built from shapes and hold no user
    tensor).  A call compares the collected tensors' signature with the stored one: a parameter
    replaced with one of another shape, moved, cast or sharded rebuilds the plan.  A submodule or a
    parameter registered on a module of the model's tree (a layer added or replaced, a parameter
    replaced) marks the plan stale through the registration hooks; registrations on other modules
    leave it alone.
    """

    def __init__(self, model: nn.Module):
        self.stale = False
        tree = list(model.modules())
        candidates = [m for m in tree if isinstance(m, SUPPORTED_LAYERS)]
        self.candidates = [weakref.ref(m) for m in candidates]
        self.symmetries = [getattr(m, _ATTR, None) for m in candidates]
        # Removing a submodule (``del model[i]``, ``delattr``) runs no hook: each container's child
        # count is compared instead.
        self.containers = [(weakref.ref(m), len(m._modules)) for m in tree if m._modules]
        layers = attached_layers(model)
        if not layers:
            raise ValueError("model: no layer has a symmetry attached; call attach_symmetry / attach_symmetries "
                             "/ attach_regular_gcnn first")
        # Sharded (DTensor / FSDP2) models: the plan keeps their layers and is not cached (see
        # _model_plan); their local shapes are read at every call (FSDP2 swaps sharded and unsharded
        # parameters without any registration hook), and the multi-tensor plans of the local shards
        # come from multi.plan_for's cache.
        self.sharded = D.sharded_layers(model, layers)
        if self.sharded is not None:
            self.modules, self.weight_plans, self.bias_modules, self.steerable_biases = [], [], [], []
            self.with_biases = None
            return
        _check_layers(layers)  # errors name the layer, not its position in the multi-tensor call
        self.modules = [weakref.ref(m) for _, m, _ in layers]
        weights = [m.weight for _, m, _ in layers]
        biases = [m.bias for _, m, _ in layers]
        self.signature = _signature(weights + biases)
        by_backend: Dict[str, List[int]] = {}
        for i, (_, _, sym) in enumerate(layers):
            by_backend.setdefault(sym.backend, []).append(i)
        self.weight_plans = []
        for backend, idx in by_backend.items():
            _, key = collect([(weights[i], layers[i][2].group, layers[i][2].in_rep, layers[i][2].out_rep) for i in idx])
            self.weight_plans.append((idx if len(by_backend) > 1 else None, plan_for(key, backend)))
        # Regular-field biases (by their layer's index), grouped by field size (one concatenation per size).
        sizes = [None if m.bias is None else kind_of(sym.group).bias_fields(sym.group, sym.out_rep)
                 for _, m, sym in layers]
        regular = [(i, layers[i][2]) for i, size in enumerate(sizes) if size is not None]
        self.bias_modules = [(i, sizes[i]) for i, _ in regular]
        self.with_biases = (self._fused_plan(key, [(biases[i], sym) for i, sym in regular], by_backend)
                            if len(by_backend) == 1 else None)
        # Biases whose projection is their layer's own (steerable layers), one term each.
        self.steerable_biases = [(i, name, sym) for i, (name, m, sym) in enumerate(layers)
                                 if m.bias is not None and kind_of(sym.group).bias_per_layer(sym.group, sym.out_rep)]
        for m in tree:
            _watch(m, self)

    @staticmethod
    def _fused_plan(weight_key: tuple, regular: list, by_backend: dict):
        """One whole-model plan over the weights and the regular-field biases, where the weights'
        plan is the native op and every such bias sits with the weights (device, floating dtype).

        A bias of C channels in regular fields is a [C, 1] Linear weight with trivial input and
        regular output fields: its projection is exactly the field means.  So the op that serves
        the weights serves the biases too, passed as they are (1-D, C entries: the op reads the
        table's geometry, not the shape), and the penalty's bias term costs no concatenation, no
        per-size reduction and no autograd nodes of its own."""
        backend = next(iter(by_backend))
        weight_plan = plan_for(weight_key, backend)
        if not regular or not getattr(weight_plan, "native", False):
            return None
        device = weight_key[0][2]
        entries = []
        for b, sym in regular:
            if b.device != device or not b.is_floating_point() or b.dim() != 1:
                return None
            entries.append((torch.Size((b.numel(), 1)), b.dtype, b.device, sym.group, "trivial", "regular"))
        return plan_for(weight_key + tuple(entries), backend)

    def current(self):
        """(weights, biases) of the attached layers if this plan still describes the model, else None."""
        if self.stale:
            return None
        syms = self.symmetries
        for i, ref in enumerate(self.candidates):
            m = ref()
            if m is None or getattr(m, _ATTR, None) is not syms[i]:
                return None
        for ref, n in self.containers:
            m = ref()
            if m is None or len(m._modules) != n:
                return None
        if self.sharded is not None:
            return [], []
        modules = [ref() for ref in self.modules]
        if None in modules:
            return None
        weights = [m.weight for m in modules]
        biases = [m.bias for m in modules]
        if _signature(weights + biases) != self.signature:
            return None
        return weights, biases


def _signature(tensors) -> list:
    # The type too: a parameter sharded in place (FSDP2's fully_shard) keeps its global shape.
    return [(type(t), t.shape, t.dtype, t.device) if t is not None else None for t in tensors]


# Every module of a model with a cached plan -> {id(plan): plan} of the plans it belongs to, both
# held weakly and keyed by id (a module class may be unhashable, or hash on attributes that are not
# set yet while its __init__ registers parameters).  A registration on one of them marks those
# plans stale; the hooks run for every module anyone creates, so the miss is one dict lookup.
_WATCHED: Dict[int, Tuple[weakref.ref, "weakref.WeakValueDictionary[int, _ModelPlan]"]] = {}


def _watch(module: nn.Module, plan: _ModelPlan) -> None:
    key = id(module)
    entry = _WATCHED.get(key)
    if entry is None or entry[0]() is not module:
        def forget(ref, key=key):
            if _WATCHED.get(key, (None,))[0] is ref:
                del _WATCHED[key]
        entry = _WATCHED[key] = (weakref.ref(module, forget), weakref.WeakValueDictionary())
    entry[1][id(plan)] = plan


def _registered(module, name, value):
    entry = _WATCHED.get(id(module))
    if entry is not None and entry[0]() is module:
        for plan in list(entry[1].values()):
            plan.stale = True


torch.nn.modules.module.register_module_module_registration_hook(_registered)
torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
_MODEL_PLANS: "weakref.WeakKeyDictionary[nn.Module, _ModelPlan]" = weakref.WeakKeyDictionary()
ON_CHANGE.append(_MODEL_PLANS.clear)  # a backend registered or replaced: plans hold resolved backends


def _model_plan(model: nn.Module):
    """(plan, weights, biases) of ``model``, from the cache when the model is unchanged."""
    plan = _MODEL_PLANS.get(model)
    if plan is not None:
        tensors = plan.current()
        if tensors is not None:
            return (plan, *tensors)
    plan = _ModelPlan(model)
    if plan.sharded is not None:
        # Not cached: its layers hold the modules, and FSDP2's records (which it reads the shards
        # from) hold them too, so a cached one would keep the model alive.  Rebuilding is a walk of
        # the model, small beside the call's all-reduce.
        return plan, [], []
    _MODEL_PLANS[model] = plan
    return (plan, *plan.current())


def _weight_terms(plan: _ModelPlan, weights) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of ||W - P(W)||^2, sum of ||P(W)||^2): one whole-model op per backend named in the
    symmetries (normally just one), so the cost does not grow in calls with depth."""
    pen = eq = None
    for idx, multi in plan.weight_plans:
        p, e, _, _ = multi.run(weights if idx is None else [weights[i] for i in idx])
        pen = p if pen is None else pen + p.to(pen.device)
        eq = e if eq is None else eq + e.to(eq.device)
    return pen, eq


def _bias_term(plan: _ModelPlan, biases) -> Optional[torch.Tensor]:
    """||b - P(b)||^2 summed over the regular-field biases, one concatenation per field size, and
    over the biases of steerable layers (``biases``: the attached layers', in the plan's order)."""
    by_size: Dict[int, list] = {}
    for i, size in plan.bias_modules:
        by_size.setdefault(size, []).append(biases[i].view(-1, size))
    total = None
    for fields in by_size.values():
        b = torch.cat(fields) if len(fields) > 1 else fields[0]
        t = _field_deviation_sq(b)
        total = t if total is None else total + t.to(total.device)
    t = _per_layer_bias_term(plan, biases)
    if t is not None:
        total = t if total is None else total + t.to(total.device)
    return total


def _per_layer_bias_term(plan: _ModelPlan, biases) -> Optional[torch.Tensor]:
    """The biases whose projection is their layer's own (steerable layers, finite-group fields other
    than trivial and regular): one term each (their projections differ layer by layer)."""
    total = None
    for i, name, sym in plan.steerable_biases:
        t = _bias_deviation_sq(biases[i], sym, f"layer {name or '(model)'!r} bias")
        total = t if total is None else total + t.to(total.device)
    return total


def model_penalty(model: nn.Module, lambda_perp: float = 1.0, lambda_G: float = 0.0, *,
                  bias: bool = True) -> torch.Tensor:
    """``sum over attached layers of lambda_perp ||W - P(W)||^2 + lambda_G ||P(W)||^2`` (differentiable).

    With ``bias=True`` the non-equivariant part of regular-field biases and of steerable layers'
    biases joins the ``lambda_perp`` term (see the module docstring).  All weights go through
    ``multi_penalty`` in one call (one pass per direction).  The model's layers, symmetries and
    tables are collected once and cached with the model; a call on an unchanged model only gathers
    its weights.  Raises ValueError if
    no layer of ``model`` has a symmetry attached (almost always a forgotten attach).

    Distributed models: a ``DistributedDataParallel`` wrapper is looked through (its weights are
    full copies: no collective).  For an FSDP2-sharded model (DTensor parameters) every rank
    computes its part on its local shards and one all-reduce of one scalar adds them; the value and
    the gradients are those of the single-process penalty on the full weights (see
    projkernels/distributed.py).  Every rank must call it (it is a collective), with the same
    arguments; a shard that cuts through a field raises ValueError with the recipe to avoid it.
    """
    if torch.compiler.is_compiling():
        return _compiled_model_penalty(model, lambda_perp, lambda_G, bias)
    if type(lambda_perp) is not float or type(lambda_G) is not float or not (
            0.0 <= lambda_perp < math.inf and 0.0 <= lambda_G < math.inf):  # the common case costs one test
        lambda_perp, lambda_G = _check_lambda("lambda_perp", lambda_perp), _check_lambda("lambda_G", lambda_G)
    model = D.unwrap(_check_model(model))
    plan, weights, biases = _model_plan(model)
    if plan.sharded is not None:
        return _sharded_penalty(plan.sharded, lambda_perp, lambda_G, bias)
    if bias and plan.with_biases is not None:
        # Weights and regular-field biases in one op; lambda_G takes the weights' entries only.
        pen, _, _, eq_per_item = plan.with_biases.run(weights + [biases[i] for i, _ in plan.bias_modules])
        total = lambda_perp * pen
        if lambda_G:
            total = total + lambda_G * eq_per_item[:len(weights)].sum()
        # A plan with steerable layers is not native; finite-group fields other than regular can be.
        b = _per_layer_bias_term(plan, biases) if plan.steerable_biases else None
        return total if b is None else total + lambda_perp * b.to(device=total.device, dtype=total.dtype)
    pen, eq = _weight_terms(plan, weights)
    total = lambda_perp * pen
    if lambda_G:
        total = total + lambda_G * eq
    if bias and (plan.bias_modules or plan.steerable_biases):
        b = _bias_term(plan, biases)
        total = total + lambda_perp * b.to(device=total.device, dtype=total.dtype)
    return total


def _sharded_penalty(layers, lambda_perp, lambda_G, bias) -> torch.Tensor:
    """``model_penalty`` of a model with DTensor parameters: the local shards' terms, summed over
    the ranks by one all-reduce, plus the terms of the weights that every rank holds in full."""
    parts = {True: [], False: []}      # sharded?: [(local weight, Symmetry, gradient scale)]
    biases = {True: [], False: []}     # sharded?: [(local bias, field size, gradient scale)]
    dtensors, dtypes = [], []
    for l in layers:
        w_glob = l.weight()
        w, sh = l.local_weight()
        if sh:
            dtensors.append(w_glob)
        dtypes.append(w_glob.dtype)
        if w is not None:
            parts[sh].append((w, l.sym, l.weight_scale()))
        b_glob = l.bias() if bias and l.sym.out_rep == "regular" else None
        if b_glob is not None:
            b, bsh = l.local_bias()
            if bsh:
                dtensors.append(b_glob)
            if b is not None:
                biases[bsh].append((b, l.field_out, l.bias_scale()))
    scales = {s for _, _, s in parts[True] + biases[True]}
    per_tensor = len(scales) > 1   # FSDP2 groups with different divide factors: scale each tensor
    # From the global dtypes, the same on every rank (the all-reduced scalars must agree).
    acc = torch.float64 if torch.float64 in dtypes else torch.float32

    def terms(sharded: bool):
        total = None
        by_backend: Dict[str, list] = {}
        for w, sym, s in parts[sharded]:
            w = D.scale_grad(w, s) if per_tensor else w
            by_backend.setdefault(sym.backend, []).append((w, sym.group, sym.in_rep, sym.out_rep))
        for backend, items in by_backend.items():
            pen, eq, _, _ = multi_penalty(items, backend=backend)
            t = lambda_perp * pen.to(acc) + (lambda_G * eq.to(acc) if lambda_G else 0.0)
            total = t if total is None else total + t.to(total.device)
        for b, size, s in biases[sharded]:
            b = (D.scale_grad(b, s) if per_tensor else b).reshape(-1, size)
            t = lambda_perp * _field_deviation_sq(b).to(acc)
            total = t if total is None else total + t.to(total.device)
        return total

    total = None
    if dtensors:
        # Every rank joins the all-reduce, also one whose shards are all empty (uneven splits).
        local = dtensors[0].to_local()
        zero = torch.zeros((), dtype=acc, device=local.device)
        mine = terms(True)
        mine = zero if mine is None else zero + mine.to(local.device)
        scale = 1.0 if per_tensor or not scales else scales.pop()
        total = D.sum_over_ranks(mine, D.process_group(dtensors), scale)
    full = terms(False)
    if full is not None:
        total = full if total is None else total + full.to(total.device)
    return total


def _compiled_model_penalty(model, lambda_perp, lambda_G, bias):
    # Traced by torch.compile: the layers are walked at trace time (guards recompile when the
    # model changes) and the weights go through multi_penalty's compiled route.
    layers = attached_layers(model)
    if not layers:
        raise ValueError("model: no layer has a symmetry attached; call attach_symmetry / attach_symmetries "
                         "/ attach_regular_gcnn first")
    if any(D.is_dtensor(m.weight) for _, m, _ in layers):
        raise NotImplementedError("model: model_penalty of a sharded (DTensor) model under torch.compile; "
                                  "call it outside the compiled region (its cost is one all-reduce of one scalar)")
    pen, eq, _, _ = multi_penalty([(m.weight, s.group, s.in_rep, s.out_rep) for _, m, s in layers])
    total = lambda_perp * pen
    if lambda_G:
        total = total + lambda_G * eq
    if bias:
        for _, m, s in layers:
            b = _bias_deviation_sq(m.bias, s)
            if b is not None:
                total = total + lambda_perp * b.to(total.dtype)
    return total


@torch.no_grad()
def project_(model: nn.Module, *, bias: bool = True) -> nn.Module:
    """Replace every attached layer's weight by P(W) in place (and, with ``bias=True``, each
    regular-field bias by its field means, each steerable layer's bias by its projection), making
    those layers exactly equivariant.

    DDP wrappers are looked through; FSDP2-sharded weights are projected shard by shard, each
    rank on its own (no collective: a shard of whole fields projects on its own), after FSDP2's
    modules are resharded (``reshard()``)."""
    wrapper, model = model, D.unwrap(_check_model(model))
    layers = attached_layers(model)
    if not layers:
        # Nothing to project: the model is not made equivariant, which the caller almost surely assumes.
        raise ValueError("model: no layer has a symmetry attached, so project_ has nothing to project; call "
                         "attach_symmetry / attach_symmetries / attach_regular_gcnn first")
    sharded = D.sharded_layers(model, layers)
    if sharded is None:
        _check_layers(layers)
    if sharded is not None:
        # FSDP2 modules holding unsharded parameters (the root after its forward) would keep using
        # those stale copies: reshard them, so that the next forward gathers the projected shards.
        D.reshard(model)
        for l in sharded:
            w, _ = l.local_weight()
            if w is not None:
                w.copy_(project(w, l.sym.group, l.sym.in_rep, l.sym.out_rep, backend=l.sym.backend))
            if bias:
                b, _ = l.local_bias()
                project_bias_(b, l.sym)
        return wrapper
    for _, module, sym in layers:
        module.weight.copy_(project(module.weight, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend))
        if bias:
            project_bias_(module.bias, sym)
    return wrapper


# --- reporting -------------------------------------------------------------------------------

def _relative(dev_sq: float, norm: float) -> float:
    """||x - P(x)|| / ||x|| from ||x - P(x)||^2 and ||x||: 0 for a zero tensor (it is equivariant),
    NaN when ||x|| is NaN or inf (a NaN or inf entry: no ratio describes the tensor, and 0 would call
    a diverged layer perfectly equivariant)."""
    if not math.isfinite(norm):
        return math.nan
    return dev_sq ** 0.5 / norm if norm > 0 else 0.0


def _non_finite(row: dict) -> bool:
    """Whether a report row holds a NaN or inf number (a weight or bias with such entries)."""
    numbers = [row["weight_norm"], row["penalty"], row["relative"], *row["spectrum"].values()]
    if row["bias_relative"] is not None:
        numbers.append(row["bias_relative"])
    return not all(math.isfinite(x) for x in numbers)


@torch.no_grad()
def equivariance_report(model: nn.Module) -> List[dict]:
    """One dict per attached layer: ``name``, ``type``, ``group``, ``in_rep``, ``out_rep``, ``shape``,
    ``weight_norm``, ``penalty``, ``relative`` (= ||W - P(W)|| / ||W||), ``bias_relative`` (the same
    for a regular-field or steerable layer's bias, else None) and ``spectrum`` ({irrep name: energy},
    summing to ||W||^2).

    DDP wrappers are looked through (names are those of the wrapped model).  For an FSDP2-sharded
    model every rank computes its shards' numbers and one all-reduce of one vector adds them: every
    rank must call it, and every rank gets the whole report."""
    model = D.unwrap(_check_model(model))
    layers = attached_layers(model)
    sharded = D.sharded_layers(model, layers)
    if sharded is not None:
        return _sharded_report(sharded)
    _check_layers(layers)
    rows = []
    for name, module, sym in layers:
        w = module.weight.detach()
        pen, eq = penalty_and_energy(w, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend)
        names = kind_of(sym.group).irrep_names(sym.group)
        if names is None:  # a kind without an isotypic spectrum (steerable): the two energies instead
            names, spec = ("equivariant", "non-equivariant"), (eq, pen)
        else:
            spec = spectrum(w, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend)
        norm = float(w.double().norm())
        b = None if module.bias is None else module.bias.detach().double()
        dev = _bias_deviation_sq(b, sym)  # float64, as the sharded report
        bias_rel = None
        if dev is not None:
            bias_rel = _relative(float(dev), float(b.norm()))
        rows.append({
            "name": name or "(model)", "type": type(module).__name__, "group": sym.group,
            "in_rep": sym.in_rep, "out_rep": sym.out_rep, "shape": list(w.shape), "weight_norm": norm,
            "penalty": float(pen), "relative": _relative(float(pen), norm),
            "bias_relative": bias_rel,
            "spectrum": dict(zip(names, (float(v) for v in spec))),
        })
    return rows


def _sharded_report(layers) -> List[dict]:
    # Per layer [penalty, ||W||^2, bias deviation^2, ||b||^2, spectrum...], float64: the sharded
    # tensors' local sums go into one vector, all-reduced once; full tensors are added after it.
    sizes = [4 + len(get_group(l.sym.group).irrep_names) for l in layers]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    dtensors = [t for l in layers for t in (l.weight(), l.bias()) if D.is_dtensor(t)]
    device = dtensors[0].to_local().device
    local = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
    full = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
    has_bias = []
    for l, at in zip(layers, starts):
        sym = l.sym
        w, sh = l.local_weight()
        if w is not None:
            w = w.detach()
            pen, _ = penalty_and_energy(w, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend)
            spec = spectrum(w, sym.group, sym.in_rep, sym.out_rep, backend=sym.backend)
            out = local if sh else full
            out[at] += pen.to(device=device, dtype=torch.float64)
            out[at + 1] += w.double().square().sum().to(device)
            out[at + 4:at + 4 + spec.numel()] += spec.to(device=device, dtype=torch.float64)
        b_glob = l.bias() if sym.out_rep == "regular" else None
        has_bias.append(b_glob is not None)
        if b_glob is not None:
            b, bsh = l.local_bias()
            if b is not None:
                f = b.detach().double().reshape(-1, l.field_out)
                out = local if bsh else full
                out[at + 2] += _field_deviation_sq(f).to(device)
                out[at + 3] += f.square().sum().to(device)
    if dtensors:
        D.all_reduce(local, D.process_group(dtensors))
    values = (local + full).tolist()
    rows = []
    for l, at, n, hb in zip(layers, starts, sizes, has_bias):
        sym, v = l.sym, values[at:at + n]
        pen, norm = v[0], v[1] ** 0.5
        bn = v[3] ** 0.5
        rows.append({
            "name": l.name, "type": D.layer_type_name(l.module), "group": sym.group, "in_rep": sym.in_rep,
            "out_rep": sym.out_rep, "shape": list(l.weight().shape), "weight_norm": norm, "penalty": pen,
            "relative": _relative(pen, norm),
            "bias_relative": _relative(v[2], bn) if hb else None,
            "spectrum": dict(zip(get_group(sym.group).irrep_names, v[4:])),
        })
    return rows


def _number(x: float, spec: str) -> str:
    # NaN / inf as "nan!" / "inf!": a diverged layer must stand out, not read as a small number.
    return format(x, spec) if math.isfinite(x) else f"{x}!"


def format_report(report: List[dict]) -> str:
    """Render ``equivariance_report`` as an aligned text table; spectra as shares of ||W||^2.

    NaN and inf numbers are printed as ``nan!`` / ``inf!``, and a last line names the layers whose
    weight or bias holds such entries."""
    head = ["layer", "type", "shape", "symmetry", "||W||", "rel. non-eq", "bias non-eq", "spectrum (share of ||W||^2)"]
    body = []
    for r in report:
        total = sum(r["spectrum"].values()) or 1.0
        spec = "  ".join(f"{k}:{_number(v / total, '.3g'):<8}" for k, v in r["spectrum"].items())
        body.append([r["name"], r["type"], "x".join(map(str, r["shape"])),
                     f"{r['group']} {r['in_rep']}->{r['out_rep']}", _number(r["weight_norm"], ".3g"),
                     _number(r["relative"], ".2e"),
                     "-" if r["bias_relative"] is None else _number(r["bias_relative"], ".2e"), spec])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    lines = [line(head), line(["-" * w for w in widths])] + [line(row) for row in body]
    bad = [r["name"] for r in report if _non_finite(r)]
    if bad:
        lines.append(f"! non-finite (NaN or inf) weights or biases in: {', '.join(bad)}")
    return "\n".join(lines)
