"""The torch.compile custom ops (``projkernels::``) behind the public API, for every backend, with
their autograd; their fake kernels are in projkernels/library/fakes.py.

Eager calls do not come here: projkernels/api.py calls a configuration's bound calls (a native
backend's C++ ops, or the Python autograd of projkernels/library/autograd.py), which cost a third of
these ops' host time.  Groups and representations travel as strings, so these ops are opaque to
``torch.compile``; the orbit table is looked up inside them (the API validated the arguments
already), and the fake kernels build it from the shape alone.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..backends.registry import resolve
from ..orbits import acc_dtype, orbit_table
from .autograd import coefficient_grads
from .fakes import register_custom_op_fakes

__all__ = ["penalty_energy", "penalty_energy_backward", "project", "spectrum"]


def _setup(weight: Tensor, group: str, in_rep: str, out_rep: str, backend: str):
    table = orbit_table(tuple(weight.shape), group, in_rep, out_rep)
    return table, resolve(backend, weight.device), weight.contiguous()


@torch.library.custom_op("projkernels::penalty_energy", mutates_args=())
def penalty_energy(weight: Tensor, group: str, in_rep: str, out_rep: str, backend: str) -> Tuple[Tensor, Tensor]:
    table, impl, w = _setup(weight, group, in_rep, out_rep, backend)
    return impl.forward(w, table)


@torch.library.custom_op("projkernels::penalty_energy_backward", mutates_args=())
def penalty_energy_backward(weight: Tensor, grad_penalty: Tensor, grad_eq: Tensor, group: str, in_rep: str,
                            out_rep: str, backend: str) -> Tensor:
    table, impl, w = _setup(weight, group, in_rep, out_rep, backend)
    acc = acc_dtype(weight.dtype)
    return impl.backward(w, table, grad_penalty.to(acc), grad_eq.to(acc)).to(weight.dtype)


def _pe_setup_context(ctx, inputs, output):
    weight, group, in_rep, out_rep, backend = inputs
    ctx.save_for_backward(weight)
    ctx.config = (group, in_rep, out_rep, backend)


def _pe_backward(ctx, grad_penalty, grad_eq):
    (weight,) = ctx.saved_tensors
    grad = penalty_energy_backward(weight, grad_penalty, grad_eq, *ctx.config)
    return grad, None, None, None, None


penalty_energy.register_autograd(_pe_backward, setup_context=_pe_setup_context)


def _pe_bwd_setup_context(ctx, inputs, output):
    weight, grad_penalty, grad_eq, group, in_rep, out_rep, backend = inputs
    ctx.save_for_backward(weight, grad_penalty, grad_eq)
    ctx.config = (group, in_rep, out_rep, backend)


def _pe_double_backward(ctx, grad):
    # dW = 2 g_pen (W - P W) + 2 g_eq P W is linear in W with the same map applied to ``grad``, and
    # linear in (g_pen, g_eq) with coefficients 2 (W - P W) and 2 P W.
    weight, grad_penalty, grad_eq = ctx.saved_tensors
    grad_w = penalty_energy_backward(grad, grad_penalty, grad_eq, *ctx.config)
    grad_gp, grad_ge = coefficient_grads(grad, weight, project(weight, *ctx.config), grad_penalty.dtype, grad_eq.dtype)
    return grad_w, grad_gp, grad_ge, None, None, None, None


penalty_energy_backward.register_autograd(_pe_double_backward, setup_context=_pe_bwd_setup_context)


@torch.library.custom_op("projkernels::project", mutates_args=())
def project(weight: Tensor, group: str, in_rep: str, out_rep: str, backend: str) -> Tensor:
    table, impl, w = _setup(weight, group, in_rep, out_rep, backend)
    return impl.project(w, table).to(weight.dtype)


def _proj_setup_context(ctx, inputs, output):
    ctx.config = inputs[1:]


def _proj_backward(ctx, grad):
    # P is an orthogonal projector, hence self-adjoint: the vector-Jacobian product is P(grad).
    return (project(grad, *ctx.config), None, None, None, None)


project.register_autograd(_proj_backward, setup_context=_proj_setup_context)


@torch.library.custom_op("projkernels::spectrum", mutates_args=())
def spectrum(weight: Tensor, group: str, in_rep: str, out_rep: str, backend: str) -> Tensor:
    table, impl, w = _setup(weight, group, in_rep, out_rep, backend)
    return impl.spectrum(w, table)


register_custom_op_fakes(penalty_energy, penalty_energy_backward, project, spectrum)
