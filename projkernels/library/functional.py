"""The torch.func route: ``grad``, ``vjp``, ``jvp`` / forward-mode AD, ``vmap``, ``jacrev`` / ``jacfwd`` and
``functional_call`` over the public functions and ``model_penalty``.

The eager routes cannot run under functorch transforms: the native ops carry C++ autograd (which
functorch cannot see through, and whose kernels read the storage that functorch's wrapper tensors do
not have), and the eager Python nodes have no ``setup_context``, ``jvp`` or ``vmap``.  Checking for a
transform before every call would cost every eager call, so the dispatch points (projkernels/api.py,
``MultiPlan.run`` in projkernels/dispatch/multi.py) call the eager route as before and come here only when it
raised while a transform or a forward-mode dual level is active (``transformed``): the common eager
path pays nothing.

Here the weight goes, as a stack of one, through the penalty family's Functions
(projkernels/library/autograd.py, the one Python autograd) on ``StackCalls``: the configuration's
kernels on a stack ``(N, *shape)`` of its weights, below autograd and with functorch switched off,
whose ``vmap`` rules fold a vmapped batch into the stack (one kernel call per batch).
"""
from __future__ import annotations

from typing import List

import torch
import torch.autograd.forward_ad as _fwad

from ..orbits import OrbitTable
from .autograd import StackCalls, untransformed, penalty_energy as _penalty_energy, project as _project

__all__ = ["transformed", "untransformed", "penalty_energy", "project", "multi_penalty"]

_transforms_active = torch._C._are_functorch_transforms_active


def transformed() -> bool:
    """True inside a torch.func transform or a ``torch.autograd.forward_ad.dual_level`` (the only
    places where the eager route's error means "take this route")."""
    return _transforms_active() or _fwad._current_level >= 0


# --- the entry points of the dispatch hooks ----------------------------------------------------------

def _stack_calls(cfg) -> StackCalls:
    if not isinstance(cfg.table, OrbitTable):
        raise NotImplementedError(
            "projkernels: torch.func transforms and forward-mode AD are supported for finite groups; a steerable "
            "symmetry's ops have reverse-mode autograd only (call them outside the transform)")
    return StackCalls(cfg.table, cfg.backend)


def penalty_energy(weight: torch.Tensor, cfg):
    """``(penalty, eq_energy)`` of one weight of configuration ``cfg`` (projkernels/dispatch/config.py)."""
    pen, eq = _penalty_energy(weight.unsqueeze(0), _stack_calls(cfg))
    return pen.squeeze(0), eq.squeeze(0)


def project(weight: torch.Tensor, cfg) -> torch.Tensor:
    return _project(weight.unsqueeze(0), _stack_calls(cfg)).squeeze(0)


def multi_penalty(plan, weights: List[torch.Tensor]):
    """``MultiPlan.run`` on this route: layer by layer (each layer one kernel call, also over a vmapped
    batch), summed in the accumulation dtype.  An item is reshaped to its table's shape (the fused
    model plan passes regular-field biases as they are, 1-D)."""
    impl = getattr(plan, "backend", None)
    if impl is None:
        raise NotImplementedError(
            "projkernels: torch.func transforms and forward-mode AD are supported for finite groups; a steerable "
            "symmetry's ops have reverse-mode autograd only (call them outside the transform)")
    pens, eqs = [], []
    for w, table in zip(weights, plan.table.tables):
        p, e = _penalty_energy(w.reshape(table.shape).unsqueeze(0), StackCalls(table, impl))
        pens.append(p.to(plan.acc))
        eqs.append(e.to(plan.acc))
    pen, eq = torch.cat(pens), torch.cat(eqs)
    return pen.sum(), eq.sum(), pen, eq
