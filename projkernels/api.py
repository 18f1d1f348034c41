"""The public functions of SPEC section 5."""
from __future__ import annotations

import torch

from . import ops
from .backends import check_backend_name
from .groups import group_name_for_ops
from .orbits import check_weight

__all__ = ["projected_penalty", "equivariant_energy", "penalty_and_energy", "project", "spectrum"]


def _args(weight, group, in_rep, out_rep, backend):
    check_weight(weight)
    check_backend_name(backend)
    group = group_name_for_ops(group)
    for name, rep in (("in_rep", in_rep), ("out_rep", out_rep)):
        if not isinstance(rep, str):
            raise TypeError(f"{name}: expected 'trivial' or 'regular' (str), got {type(rep).__name__}")
    return weight, group, in_rep, out_rep, backend


def penalty_and_energy(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """``(||W - P(W)||^2, ||P(W)||^2)`` from one pass; both differentiable.

    Results are float64 for float64 weights and float32 otherwise (half types accumulate in float32
    and are returned in float32, so a small penalty is not rounded away).
    """
    return ops.penalty_energy(*_args(weight, group, in_rep, out_rep, backend))


def projected_penalty(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """||W - P(W)||_F^2, the non-equivariance penalty (0-dim tensor; gradient 2 (W - P(W)))."""
    return penalty_and_energy(weight, group, in_rep, out_rep, backend=backend)[0]


def equivariant_energy(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """||P(W)||_F^2, the energy of the equivariant part (0-dim tensor; gradient 2 P(W))."""
    return penalty_and_energy(weight, group, in_rep, out_rep, backend=backend)[1]


def project(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """P(W), the nearest exactly equivariant weight, shaped and typed like ``weight``."""
    return ops.project(*_args(weight, group, in_rep, out_rep, backend))


def spectrum(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """Isotypic energies of W, one per real irrep in ``irrep_names(group)`` order (not differentiable).

    Entry 0 is ``equivariant_energy`` and the rest sum to ``projected_penalty``.  float64 for
    float64 weights, float32 otherwise.
    """
    with torch.no_grad():
        return ops.spectrum(*_args(weight.detach() if isinstance(weight, torch.Tensor) else weight,
                                   group, in_rep, out_rep, backend))
