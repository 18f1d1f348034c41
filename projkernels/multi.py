"""The penalty of a whole model in one call: every layer's weight, one pass per direction.

A model has tens of weights; calling ``penalty_and_energy`` per weight costs tens of small launches
and tens of autograd nodes per step.  ``multi_penalty`` takes them all at once.  A call looks its
configuration (every layer's shape, dtype, device, group and reps, and the backend) up in a cache;
the first call validates it, builds the layers' ``MultiTable`` (projkernels/multi_table.py) and
picks the route, later calls go straight to it:

- native backends ("cpp", "cuda"): one ``projkernels_C::multi_penalty`` op per dtype present (one
  for the usual single-dtype model), autograd in C++, tables resident on the device; on CUDA the
  op copies nothing from the host (its layer descriptors are kernel arguments), so a training step
  that calls it can be captured in a CUDA graph as it is;
- a backend with Python multi-tensor kernels (the concatenated "reference" route of
  projkernels/multi_reference.py, or one registered with ``register_multi_backend``): through
  ``MultiPenaltyFunction`` (projkernels/multi_autograd.py);
- a single-weight backend without multi-tensor kernels (for example "triton"): layer by layer.

``backend="auto"`` walks the same per-device order as the single-weight API (``backends.AUTO_ORDER``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import functional, multi_reference  # noqa: F401  (multi_reference registers the reference route's kernels)
from .backends import (AUTO_ORDER, BACKENDS, ON_CHANGE, MultiKernels, check_backend_name, register_multi_kernels, resolve,
                       why_unavailable)
from .multi_autograd import MultiPenaltyFunction, per_layer
from .multi_inputs import collect, validate
from .multi_table import MultiTable, multi_table
from .orbits import acc_dtype
from .steerable import MixedPlan, SteerableSymmetry

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


def _choose(backend: str, device: torch.device):
    """(the backend ``backend`` names on ``device``, its multi-tensor kernels)."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if why_unavailable(name, device) is None:
                chosen = BACKENDS[name]
                break
        else:
            chosen = BACKENDS["reference"]
    else:
        chosen = resolve(backend, device)  # the clear RuntimeError when it cannot serve the device
    return chosen, (chosen.multi if chosen.multi is not None else per_layer(chosen.name))


class MultiPlan:
    """A validated configuration of layers and what a call on it runs (built once, then cached)."""

    def __init__(self, table: MultiTable, device: torch.device, dtypes: List[torch.dtype], kernels: MultiKernels):
        self.table, self.kernels = table, kernels
        self.buf_dtype = functools.reduce(torch.promote_types, dtypes)
        self.acc = functools.reduce(torch.promote_types, (acc_dtype(d) for d in dtypes))
        self.native = kernels.native
        self.groups: List[Tuple[List[int], object]] = []  # (layer indices, the op bound to their tables)
        self.inverse: Optional[torch.Tensor] = None
        if self.native:
            # projkernels_C::multi_penalty bound to the layers' device tables (csrc/python_calls.cpp):
            # a call converts the weights from Python, not the 2 L table tensors.
            from ._C import MultiCall
            by_dtype: Dict[torch.dtype, List[int]] = {}
            for i, d in enumerate(dtypes):
                by_dtype.setdefault(d, []).append(i)
            for d, idx in by_dtype.items():
                sub = table if len(by_dtype) == 1 else multi_table(
                    [(t.shape, t.group.name, *_reps(t)) for t in (table.tables[i] for i in idx)])
                a = sub.native_args(device, d)
                self.groups.append((idx, MultiCall(a.offsets, a.inv_stab, a.consts, a.geometry)))
            if len(by_dtype) > 1:
                order = [i for idx, _ in self.groups for i in idx]
                self.inverse = torch.argsort(torch.tensor(order)).to(device)

    def run(self, weights: List[torch.Tensor]):
        try:
            if not self.native:
                return MultiPenaltyFunction.apply(self.table, self.kernels, self.buf_dtype, *weights)
            if self.inverse is None:
                return self.groups[0][1](weights)
            # One op per dtype; the per-layer results are put back into the caller's order.
            outs = [call([weights[i] for i in idx]) for idx, call in self.groups]
        except RuntimeError:  # hook: torch.func transforms and forward-mode AD (projkernels/functional.py)
            if not functional.transformed():
                raise
            return functional.multi_penalty(self, weights)
        acc = self.acc
        total_pen = functools.reduce(torch.add, (o[0].to(acc) for o in outs))
        total_eq = functools.reduce(torch.add, (o[1].to(acc) for o in outs))
        pen = torch.cat([o[2].to(acc) for o in outs]).index_select(0, self.inverse)
        eq = torch.cat([o[3].to(acc) for o in outs]).index_select(0, self.inverse)
        return total_pen, total_eq, pen, eq



def _reps(t) -> Tuple[str, str]:
    return ("trivial" if t.field_in == 1 else "regular"), ("trivial" if t.field_out == 1 else "regular")


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
        if any(isinstance(k[3], SteerableSymmetry) for k in key):  # hook: steerable symmetries (their own route)
            plan = MixedPlan(key, backend, lambda finite: plan_for(tuple(finite), backend))
        else:
            check_backend_name(backend)
            specs = validate(key)
            device = torch.device(key[0][2])
            impl, kernels = _choose(backend, device)
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
    # Under torch.compile: one Python custom op per layer (projkernels/ops.py), opaque to the
    # tracer, tables built from shapes by their fake kernels; the compiled graph (and CUDA graphs)
    # remove the per-layer host cost that these ops have in eager mode.
    from . import ops
    from .groups import group_name_for_ops
    check_backend_name(backend)
    from .api import penalty_and_energy
    pairs = [penalty_and_energy(w, g, a, b, backend=backend) if isinstance(g, SteerableSymmetry)  # hook: steerable
             else ops.penalty_energy(w, group_name_for_ops(g), a, b, backend) for w, (_, _, _, g, a, b) in zip(weights, key)]
    acc = functools.reduce(torch.promote_types, (acc_dtype(w.dtype) for w in weights))
    pen = torch.stack([p.to(acc) for p, _ in pairs])
    eq = torch.stack([e.to(acc) for _, e in pairs])
    return pen.sum(), eq.sum(), pen, eq
