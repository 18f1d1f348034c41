"""Every fake (meta) kernel of the package, for torch.compile and opcheck: the compiled extension's
ops (``projkernels_C::``, registered by projkernels/backends/native.py once the library is loaded)
and the Python custom ops (``projkernels::``, registered by projkernels/library/custom_ops.py).

The compiled ops' fakes give shapes and dtypes only; the custom ops' fakes also build the orbit
table from the weight's shape (with fake tensors switched off: the table is real data, not a traced
value), so that the first compiled call needs no eager warm-up.
"""
from __future__ import annotations

import torch

from ..groups import get_group
from ..orbits import acc_dtype, orbit_table

__all__ = ["register_native_fakes", "register_custom_op_fakes"]


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((), dtype=acc_dtype(t.dtype))


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _register(op: str, fn) -> None:
    try:
        torch.library.register_fake(op)(fn)
    except RuntimeError:
        pass  # already registered (the module was reloaded)


# --- the compiled extension's ops ------------------------------------------------------------------

def _fused_forward(weight, offsets, inv_stab, basis, row_irrep, n_irreps, c_out, c_in, stride_out, stride_in,
                   signed_offsets=0, with_spectrum=True):
    torch._check(n_irreps >= 1, lambda: f"fused_forward: n_irreps must be positive, got {n_irreps}")
    return _scalar(weight), _scalar(weight), weight.new_empty((n_irreps,), dtype=acc_dtype(weight.dtype))


def _fused_backward(weight, grad_penalty, grad_eq, offsets, inv_stab, c_out, c_in, stride_out, stride_in,
                    signed_offsets=0):
    return _like(weight)


def _multi_forward(weights, offsets, inv_stab, geometry):
    torch._check(len(weights) >= 1, lambda: "multi_forward: weights is empty")
    acc = acc_dtype(weights[0].dtype)
    n = len(weights)
    return weights[0].new_empty((n,), dtype=acc), weights[0].new_empty((n,), dtype=acc)


def _multi_backward(weights, grad_penalty, grad_eq, offsets, inv_stab, geometry):
    torch._check(len(weights) >= 1, lambda: "multi_backward: weights is empty")
    return [_like(w) for w in weights]


def _penalty_energy(weight, table, geometry):
    return _scalar(weight), _scalar(weight)


def _penalty_energy_backward(weight, grad_penalty, grad_eq, table, geometry):
    return _like(weight)


def _project(weight, table, geometry):
    return _like(weight)


def _spectrum(weight, table, geometry):
    return weight.new_empty((geometry[0],), dtype=acc_dtype(weight.dtype))


def _multi_penalty(weights, offsets, inv_stab, consts, geometry):
    torch._check(len(weights) >= 1, lambda: "multi_penalty: weights is empty")
    n, w = len(weights), weights[0]
    acc = acc_dtype(w.dtype)
    return _scalar(w), _scalar(w), w.new_empty((n,), dtype=acc), w.new_empty((n,), dtype=acc)


def _multi_penalty_backward(weights, grad_penalty, grad_eq, offsets, inv_stab, consts, geometry):
    return [_like(w) for w in weights]


def _in_place(*args, **kwargs):
    return None  # in-place ops with no outputs: their fakes only have to exist


def register_native_fakes(ops) -> None:
    """The fakes of the ``projkernels_C::`` ops that ``ops`` (``torch.ops.projkernels_C``) has."""
    table = {
        "fused_forward": _fused_forward, "fused_backward": _fused_backward,
        "multi_forward": _multi_forward, "multi_backward": _multi_backward,
        "penalty_energy": _penalty_energy, "penalty_energy_backward": _penalty_energy_backward,
        "project": _project, "spectrum": _spectrum,
        "multi_penalty": _multi_penalty, "multi_penalty_backward": _multi_penalty_backward,
        # The steerable ops take the same arguments and return the same shapes.
        "steerable_penalty_energy": _penalty_energy,
        "steerable_penalty_energy_backward": _penalty_energy_backward,
        "steerable_project": _project,
        "multi_decay_": _in_place, "multi_decay_grad_": _in_place,
    }
    for name, fn in table.items():
        if hasattr(ops, name):  # an extension built before an op lacks it
            _register(f"projkernels_C::{name}", fn)


# --- the Python custom ops -------------------------------------------------------------------------

def _fake_table(weight, group: str, in_rep: str, out_rep: str) -> None:
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    with unset_fake_temporarily():
        orbit_table(tuple(int(s) for s in weight.shape), group, in_rep, out_rep)


def _op_penalty_energy(weight, group, in_rep, out_rep, backend):
    _fake_table(weight, group, in_rep, out_rep)
    return _scalar(weight), _scalar(weight)


def _op_penalty_energy_backward(weight, grad_penalty, grad_eq, group, in_rep, out_rep, backend):
    return _like(weight)


def _op_project(weight, group, in_rep, out_rep, backend):
    _fake_table(weight, group, in_rep, out_rep)
    return _like(weight)


def _op_spectrum(weight, group, in_rep, out_rep, backend):
    _fake_table(weight, group, in_rep, out_rep)
    return weight.new_empty((len(get_group(group).irrep_names),), dtype=acc_dtype(weight.dtype))


def register_custom_op_fakes(penalty_energy, penalty_energy_backward, project, spectrum) -> None:
    penalty_energy.register_fake(_op_penalty_energy)
    penalty_energy_backward.register_fake(_op_penalty_energy_backward)
    project.register_fake(_op_project)
    spectrum.register_fake(_op_spectrum)


# The extension names this module as the home of its fakes (``set_python_module`` in
# csrc/ops/schemas.cpp): importing it registers those of the ops already loaded.
register_native_fakes(torch.ops.projkernels_C)
