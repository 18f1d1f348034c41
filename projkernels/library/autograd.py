"""The Python autograd of the penalty family, written once for every Python route.

Three ``torch.autograd.Function`` s act on one weight through a ``calls`` object that the backend
binds to a configuration (a finite group's orbit table on the "reference" or "triton" backend, a
steerable symmetry's layout on the "reference" or "triton" backend, or any registered backend):

    calls.forward(W)                 -> (penalty, eq_energy, saved)   accumulation dtype
    calls.gradient(W, g_p, g_e, saved) -> 2 g_p (W - P W) + 2 g_e P W  weight's dtype
    calls.project(W)                 -> P W                           weight's dtype

``saved`` is whatever the forward computed that the gradient may reuse (the reference steerable
route keeps its P W tiles), or None.  The gradient is linear in W (the same map applied to the
incoming gradient) and in (g_p, g_e) (coefficients 2 (W - P W) and 2 P W), and P is self-adjoint, so
every derivative is one of these Functions again: double backward works to any order.

The compiled backends bind public C++ ops instead (their autograd is C++: csrc/autograd/autograd.cpp); under
torch.func transforms the calls go through projkernels/library/functional.py, and under
torch.compile through projkernels/library/custom_ops.py.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..orbits import acc_dtype

__all__ = ["Calls", "penalty_energy", "project", "spectrum", "coefficient_grads", "FiniteCalls", "EAGER"]


class Calls(NamedTuple):
    """What a configuration calls, each ``f(weight, *op_args)``."""
    penalty_energy: object
    project: object
    spectrum: object


def coefficient_grads(grad, weight, pw, pen_dtype, eq_dtype):
    """The gradients of dW = 2 g_pen (W - P W) + 2 g_eq P W with respect to (g_pen, g_eq), given the
    incoming ``grad`` and P W: 2 <grad, W - P W> and 2 <grad, P W>, formed in the accumulation dtype."""
    acc = acc_dtype(weight.dtype)
    g, w, p = grad.to(acc), weight.to(acc), pw.to(acc)
    return (2 * g * (w - p)).sum().to(pen_dtype), (2 * g * p).sum().to(eq_dtype)


class _PenaltyEnergy(torch.autograd.Function):
    """(penalty, eq_energy) of one weight, in the accumulation dtype."""

    @staticmethod
    def forward(ctx, weight, calls):
        pen, eq, saved = calls.forward(weight)
        ctx.save_for_backward(weight)
        ctx.calls, ctx.saved = calls, saved
        return pen, eq

    @staticmethod
    def backward(ctx, grad_penalty, grad_eq):
        (weight,) = ctx.saved_tensors
        return _Gradient.apply(weight, grad_penalty, grad_eq, ctx.calls, ctx.saved), None


class _Gradient(torch.autograd.Function):
    """2 grad_penalty (W - P W) + 2 grad_eq P W in the weight's dtype (differentiable again).
    ``saved`` (the forward's reusable work, or None) only saves time; autograd does not see it."""

    @staticmethod
    def forward(ctx, weight, grad_penalty, grad_eq, calls, saved):
        ctx.save_for_backward(weight, grad_penalty, grad_eq)
        ctx.calls = calls
        return calls.gradient(weight, grad_penalty, grad_eq, saved)

    @staticmethod
    def backward(ctx, grad):
        weight, grad_penalty, grad_eq = ctx.saved_tensors
        calls = ctx.calls
        grad_w = grad_gp = grad_ge = None
        if ctx.needs_input_grad[0]:
            grad_w = _Gradient.apply(grad, grad_penalty, grad_eq, calls, None)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_gp, grad_ge = coefficient_grads(grad, weight, _Project.apply(weight, calls), grad_penalty.dtype,
                                                 grad_eq.dtype)
        return grad_w, grad_gp, grad_ge, None, None


class _Project(torch.autograd.Function):
    """P(W) in the weight's dtype; its vector-Jacobian product is P(grad) (P is self-adjoint)."""

    @staticmethod
    def forward(ctx, weight, calls):
        ctx.calls = calls
        return calls.project(weight)

    @staticmethod
    def backward(ctx, grad):
        return _Project.apply(grad, ctx.calls), None


def penalty_energy(weight: torch.Tensor, calls):
    return _PenaltyEnergy.apply(weight, calls)


def project(weight: torch.Tensor, calls) -> torch.Tensor:
    return _Project.apply(weight, calls)


def spectrum(weight: torch.Tensor, calls) -> torch.Tensor:
    # A report, not a training quantity: no autograd node.
    with torch.no_grad():
        return calls.spectrum(weight.detach())


class FiniteCalls:
    """A finite-group configuration's calls on a Python backend: the backend's single-weight kernels
    over the configuration's orbit table."""
    __slots__ = ("table", "impl")

    def __init__(self, table, impl):
        self.table, self.impl = table, impl

    def forward(self, w):
        pen, eq = self.impl.forward(w.contiguous(), self.table)
        return pen, eq, None

    def gradient(self, w, gp, ge, saved):
        acc = acc_dtype(w.dtype)
        return self.impl.backward(w.contiguous(), self.table, gp.to(acc), ge.to(acc)).to(w.dtype)

    def project(self, w):
        return self.impl.project(w.contiguous(), self.table).to(w.dtype)

    def spectrum(self, w):
        return self.impl.spectrum(w.contiguous(), self.table)


EAGER = Calls(penalty_energy, project, spectrum)
