"""The penalty of a whole model in one call: every layer's weight, one pass per direction.

A model has tens of weights; calling ``penalty_and_energy`` per weight costs tens of small launches
and tens of autograd nodes per step.  ``multi_penalty`` takes them all at once.  A call looks its
configuration (every layer's shape, dtype, device, group and reps, and the backend) up in a cache;
the first call validates it, builds the layers' ``MultiTable`` (projkernels/dispatch/multi_table.py) and
picks the route, later calls go straight to it:

- a backend whose multi slot binds its own op (the compiled "cpp" and "cuda":
  ``projkernels_C::multi_penalty``, autograd in C++, tables resident on the device;
  projkernels/backends/native.py);
- a backend with Python multi-tensor kernels (the concatenated "reference" route of
  projkernels/backends/reference/multi.py, or one registered with ``register_multi_backend``):
  through ``MultiPenaltyFunction`` (projkernels/library/multi_autograd.py);
- a single-weight backend without multi-tensor kernels (for example "triton"): layer by layer;
- items whose symmetry kind is not fused into one table (steerable symmetries): each through its
  single-weight configuration (``MixedPlan``).

The backend comes from the one resolver, ``backends.resolve(backend, device, "multi")``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..backends.registry import ON_CHANGE, MultiKernels, check_backend_name, register_multi_kernels, resolve
from ..groups import group_name_for_ops
from ..library import custom_ops, functional
from ..library.multi_autograd import MultiPenaltyFunction, per_layer
from ..orbits import acc_dtype
from ..symmetry import kind_of
from .config import config_on
from .multi_inputs import collect, validate
from .multi_table import MultiTable, multi_table

__all__ = ["multi_penalty", "MultiTable", "multi_table", "MultiBackend", "register_multi_backend", "MultiPlan",
           "plan_for"]

@dataclass(frozen=True)
class MultiBackend:
    """A multi-tensor backend for ``register_multi_backend``: ``forward(x, table) -> (penalty [L],
    eq [L])`` and ``backward(x, table, grad_penalty [L], grad_eq [L]) -> dx`` over the concatenated
    buffer (``concatenated=True``) or the list of contiguous weights."""
    name: str
    forward: Callable
    backward: Callable
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    concatenated: bool = True


def register_multi_backend(backend: MultiBackend) -> None:
    """Give backend ``backend.name`` Python multi-tensor kernels (they take over from a native op)."""
    register_multi_kernels(backend.name, MultiKernels(backend.forward, backend.backward, backend.concatenated),
                           backend.unavailable)


class MultiPlan:
    """A validated configuration of layers and what a call on it runs (built once, then cached)."""

    def __init__(self, table: MultiTable, device: torch.device, dtypes: List[torch.dtype], kernels: MultiKernels):
        self.table, self.kernels = table, kernels
        self.buf_dtype = functools.reduce(torch.promote_types, dtypes)
        self.acc = functools.reduce(torch.promote_types, (acc_dtype(d) for d in dtypes))
        self.native = kernels.bind is not None
        # The backend's own whole-model op bound to the layers' tables (the compiled backends).
        self.call = kernels.bind(table, device, dtypes) if self.native else None

    def run(self, weights: List[torch.Tensor]):
        try:
            if self.call is None:
                return MultiPenaltyFunction.apply(self.table, self.kernels, self.buf_dtype, *weights)
            return self.call(weights)
        except RuntimeError:  # hook: torch.func transforms and forward-mode AD (projkernels/library/functional.py)
            if not functional.transformed():
                raise
            return functional.multi_penalty(self, weights)


class MixedPlan:
    """``multi_penalty`` over items of which some have a symmetry kind that is not fused into one
    table (steerable symmetries): those go through their single-weight configurations, the others
    through one fused plan; per-layer results in the callers' order."""

    def __init__(self, key: tuple, backend: str, fused_plan):
        self.single = [i for i, k in enumerate(key) if not kind_of(k[3]).multi_fused]
        self.fused = [i for i, k in enumerate(key) if kind_of(k[3]).multi_fused]
        self.cfgs = []
        for i in self.single:
            try:
                self.cfgs.append(config_on(*key[i], backend))
            except (TypeError, ValueError) as e:
                raise type(e)(f"items[{i}]: {e}") from None
        # As for every multi-tensor call: float64 when any weight is float64.
        self.acc = functools.reduce(torch.promote_types, (acc_dtype(k[1]) for k in key))
        self.fused_plan = fused_plan([key[i] for i in self.fused]) if self.fused else None
        self.device = torch.device(key[0][2])
        self.inverse = torch.argsort(torch.tensor(self.single + self.fused)).to(self.device)  # uploaded once
        for i, k in enumerate(key):
            if k[2] != key[0][2]:
                raise ValueError(f"items[{i}]: weight is on {k[2]}, but items[0] is on {key[0][2]}; "
                                 "all weights must be on one device")

    def run(self, weights):
        pens, eqs = [], []
        for i, cfg in zip(self.single, self.cfgs):
            p, e = cfg.ops.penalty_energy(weights[i], *cfg.op_args)
            pens.append(p.to(self.acc))
            eqs.append(e.to(self.acc))
        if self.fused_plan is not None:
            _, _, p, e = self.fused_plan.run([weights[i] for i in self.fused])
            pens.extend(p.to(self.acc).unbind(0))
            eqs.extend(e.to(self.acc).unbind(0))
        pen = torch.stack(pens).index_select(0, self.inverse)
        eq = torch.stack(eqs).index_select(0, self.inverse)
        return pen.sum(), eq.sum(), pen, eq


_PLANS: Dict[tuple, MultiPlan] = {}
_MAX_PLANS = 1024


def plan_for(key: tuple, backend: str) -> MultiPlan:
    """The cached plan for ``key`` (from ``multi_inputs.collect``), validated and built on a miss.
    Built from shapes, dtypes and devices only."""
    full = (key, backend)
    try:
        return _PLANS[full]
    except (KeyError, TypeError):
        pass
    with functional.untransformed():  # under torch.func transforms the tables are still plain tensors
        check_backend_name(backend)
        if not all(kind_of(k[3]).multi_fused for k in key):
            plan = MixedPlan(key, backend, lambda fused: plan_for(tuple(fused), backend))
        else:
            specs = validate(key)
            device = torch.device(key[0][2])
            impl = resolve(backend, device, "multi")  # the clear RuntimeError when it cannot serve the device
            kernels = impl.multi if impl.multi is not None else per_layer(impl.name)
            plan = MultiPlan(multi_table(specs), device, [k[1] for k in key], kernels)
            plan.backend = impl  # the single-weight kernels, for the torch.func route
    try:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[full] = plan
    except TypeError:
        pass  # an unhashable group object: valid, but not cacheable
    return plan


def clear_plans() -> None:
    """Forget every cached plan (the backend registry changed)."""
    _PLANS.clear()


ON_CHANGE.append(clear_plans)


def multi_penalty(items, *, backend: str = "auto"):
    """Penalty and equivariant energy of many weights in one pass.

    ``items``: a sequence of ``(weight, group, in_rep, out_rep)`` tuples, or of objects with
    attributes ``weight``, ``group``, ``in_rep`` and ``out_rep``.  Returns
    ``(total_penalty, total_eq_energy, per_layer_penalty [L], per_layer_eq [L])``, all
    differentiable with respect to every weight (gradient 2 (W - P W) and 2 P W per layer).

    Accumulation is float64 when the weights' promoted dtype is float64 and float32 otherwise, and
    the results have the accumulation dtype.  All weights must live on one device.
    ``backend="auto"`` uses a fused multi-tensor kernel where one is registered for the device,
    else the device's compiled single-weight backend layer by layer, else the concatenated
    reference route; an explicit backend without a multi-tensor kernel is applied layer by layer.
    ``backend="reference"`` is the concatenated route.
    """
    items = items if isinstance(items, (list, tuple)) else list(items)
    if not items:
        check_backend_name(backend)
        z = torch.zeros((), dtype=torch.float32)
        return z, z.clone(), torch.zeros(0), torch.zeros(0)
    weights, key = collect(items)
    if torch.compiler.is_compiling():
        return _compiled_multi_penalty(weights, key, backend)
    return plan_for(key, backend).run(weights)


def _compiled_multi_penalty(weights, key, backend):
    # Under torch.compile: one Python custom op per layer (projkernels/library/custom_ops.py), opaque
    # to the tracer, tables built from shapes by their fake kernels; the compiled graph (and CUDA
    # graphs) remove the per-layer host cost that these ops have in eager mode.  A kind without
    # custom ops (steerable symmetries) is traced through its own configuration's calls.
    check_backend_name(backend)
    pairs = []
    for w, k in zip(weights, key):
        g, a, b = k[3:]
        if kind_of(g).custom_ops:
            pairs.append(custom_ops.penalty_energy(w, group_name_for_ops(g), a, b, backend))
        else:
            cfg = config_on(*k, backend)
            pairs.append(cfg.ops.penalty_energy(w, *cfg.op_args))
    acc = functools.reduce(torch.promote_types, (acc_dtype(w.dtype) for w in weights))
    pen = torch.stack([p.to(acc) for p, _ in pairs])
    eq = torch.stack([e.to(acc) for _, e in pairs])
    return pen.sum(), eq.sum(), pen, eq
