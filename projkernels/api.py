"""The public single-weight functions.

Each call looks its configuration up in the validate-once cache (projkernels/dispatch/config.py); a
hit is one dictionary lookup, and the call is then ``cfg.ops.f(weight, *cfg.op_args)``: for a
native backend ("cpp", "cuda") one public ``projkernels_C`` op, whose autograd is C++
(csrc/autograd/autograd.cpp); for the others one node of the Python autograd (projkernels/library/autograd.py).  docs/design.md, "Layers
from API to kernel", walks through the layers.

Under torch.compile every backend goes through the Python custom ops of
projkernels/library/custom_ops.py (their
fake kernels build the table from the weight's shape, so the first call compiles without an eager
warm-up), and ``fullgraph=True`` holds.  With ``dynamic=True`` each weight shape still gets its own graph: the
orbit table (which entries form an orbit) is a function of the shape, so the shape is specialised.

Under torch.func transforms (and forward-mode AD) the eager call raises, and the ``hook`` lines hand
the call to projkernels/library/functional.py; the eager path itself checks nothing.
"""
from __future__ import annotations

import torch

from .dispatch.config import CONFIGS, config_for
from .distributed import is_dtensor, single_weight_error
from .groups import group_name_for_ops
from .library import custom_ops as ops, functional
from .reps import canonical_rep
from .symmetry import kind_of

_PLAIN = (torch.Tensor, torch.nn.Parameter)

__all__ = ["projected_penalty", "equivariant_energy", "penalty_and_energy", "project", "spectrum"]

def _config(weight, group, in_rep, out_rep, backend):
    if torch.compiler.is_compiling():
        if not kind_of(group).custom_ops:  # a kind traced through its own calls (steerable bases)
            return config_for(weight, group, in_rep, out_rep, backend)
        return _COMPILED
    if type(weight) not in _PLAIN and is_dtensor(weight):
        # Checked before the lookup: a DTensor has its global shape, so it could hit the entry of
        # a full weight and reach a kernel that would gather it, or fail deep inside.
        raise single_weight_error("the single-weight functions")
    try:
        # The layout too: a sparse weight of a cached dense shape must reach the checks, not a kernel.
        return CONFIGS[(weight.shape, weight.dtype, weight.device, group, in_rep, out_rep, backend, weight.layout)]
    except (KeyError, AttributeError, TypeError):
        with functional.untransformed():  # hook: under torch.func transforms the tables are still plain tensors
            return config_for(weight, group, in_rep, out_rep, backend)


class _Compiled:
    """Under torch.compile every backend goes through the Python custom ops (library/custom_ops.py):
    opaque to the tracer, with fake kernels that build the table from the shape alone, and the
    native kernels behind them at run time.  (The host cost those ops add is what compilation and
    CUDA graphs remove.)"""


_COMPILED = _Compiled()



def penalty_and_energy(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """``(||W - P(W)||^2, ||P(W)||^2)`` from one pass; both differentiable.

    Results are float64 for float64 weights and float32 otherwise (half types accumulate in float32
    and are returned in float32, so a small penalty is not rounded away).
    """
    cfg = _config(weight, group, in_rep, out_rep, backend)
    if cfg is not _COMPILED:
        try:
            return cfg.ops.penalty_energy(weight, *cfg.op_args)
        except RuntimeError:  # hook: torch.func transforms and forward-mode AD (library/functional.py)
            if not functional.transformed():
                raise
        return functional.penalty_energy(weight, cfg)
    return ops.penalty_energy(weight, group_name_for_ops(group), canonical_rep(in_rep, "in_rep"), canonical_rep(out_rep, "out_rep"), backend)


def projected_penalty(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """||W - P(W)||_F^2, the non-equivariance penalty (0-dim tensor; gradient 2 (W - P(W)))."""
    cfg = _config(weight, group, in_rep, out_rep, backend)
    if cfg is not _COMPILED:
        try:
            return cfg.ops.penalty_energy(weight, *cfg.op_args)[0]
        except RuntimeError:  # hook: torch.func transforms and forward-mode AD (library/functional.py)
            if not functional.transformed():
                raise
        return functional.penalty_energy(weight, cfg)[0]
    return ops.penalty_energy(weight, group_name_for_ops(group), canonical_rep(in_rep, "in_rep"), canonical_rep(out_rep, "out_rep"), backend)[0]


def equivariant_energy(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """||P(W)||_F^2, the energy of the equivariant part (0-dim tensor; gradient 2 P(W))."""
    return penalty_and_energy(weight, group, in_rep, out_rep, backend=backend)[1]


def project(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """P(W), the nearest exactly equivariant weight, shaped and typed like ``weight``."""
    cfg = _config(weight, group, in_rep, out_rep, backend)
    if cfg is not _COMPILED:
        try:
            return cfg.ops.project(weight, *cfg.op_args)
        except RuntimeError:  # hook: torch.func transforms and forward-mode AD (library/functional.py)
            if not functional.transformed():
                raise
        return functional.project(weight, cfg)
    return ops.project(weight, group_name_for_ops(group), canonical_rep(in_rep, "in_rep"), canonical_rep(out_rep, "out_rep"), backend)


def spectrum(weight, group="C4", in_rep="trivial", out_rep="trivial", *, backend="auto"):
    """Isotypic energies of W, one per real irrep in ``irrep_names(group)`` order (not differentiable).

    Entry 0 is ``equivariant_energy`` and the rest sum to ``projected_penalty``.  float64 for
    float64 weights, float32 otherwise.
    """
    cfg = _config(weight, group, in_rep, out_rep, backend)
    if cfg is not _COMPILED:
        return cfg.ops.spectrum(weight, *cfg.op_args)  # records no autograd node
    with torch.no_grad():
        return ops.spectrum(weight.detach(), group_name_for_ops(group), canonical_rep(in_rep, "in_rep"), canonical_rep(out_rep, "out_rep"), backend)
