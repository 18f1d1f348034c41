"""The eager route of the Python backends ("reference", "triton", and any registered later).

A configuration of a Python backend (projkernels/config.py) holds its orbit table and its resolved
``Backend``; the public functions call ``penalty_energy`` / ``project`` / ``spectrum`` below with
both, and the autograd nodes here keep them for the backward.  So an eager call looks nothing up,
validates nothing and pays one ``torch.autograd.Function`` node, where the Python custom ops of
projkernels/ops.py cost about three times as much host time (schema parsing, the dispatcher's
Python key, their own autograd wrapper).  Those custom ops remain the route under torch.compile,
where their fake kernels build the table from the weight's shape and the compiled graph removes
their host cost.

The formulas are those of projkernels/ops.py: dW = 2 g_pen (W - P W) + 2 g_eq P W, which is linear
in W (the same map applied to the incoming gradient) and in (g_pen, g_eq); P is self-adjoint.
"""
from __future__ import annotations

import torch

from .orbits import acc_dtype

__all__ = ["penalty_energy", "project", "spectrum", "coefficient_grads"]


class _PenaltyEnergy(torch.autograd.Function):
    """(penalty, eq_energy) of one weight, in the accumulation dtype."""

    @staticmethod
    def forward(ctx, weight, table, impl):
        ctx.save_for_backward(weight)
        ctx.table, ctx.impl = table, impl
        return impl.forward(weight.contiguous(), table)

    @staticmethod
    def backward(ctx, grad_penalty, grad_eq):
        (weight,) = ctx.saved_tensors
        return _Gradient.apply(weight, grad_penalty, grad_eq, ctx.table, ctx.impl), None, None


def coefficient_grads(grad, weight, pw, pen_dtype, eq_dtype):
    """The gradients of dW = 2 g_pen (W - P W) + 2 g_eq P W with respect to (g_pen, g_eq), given the
    incoming ``grad`` and P W: 2 <grad, W - P W> and 2 <grad, P W>, formed in the accumulation dtype."""
    acc = acc_dtype(weight.dtype)
    g, w, p = grad.to(acc), weight.to(acc), pw.to(acc)
    return (2 * g * (w - p)).sum().to(pen_dtype), (2 * g * p).sum().to(eq_dtype)


class _Gradient(torch.autograd.Function):
    """2 grad_penalty (W - P W) + 2 grad_eq P W in the weight's dtype (differentiable again)."""

    @staticmethod
    def forward(ctx, weight, grad_penalty, grad_eq, table, impl):
        ctx.save_for_backward(weight, grad_penalty, grad_eq)
        ctx.table, ctx.impl = table, impl
        acc = acc_dtype(weight.dtype)
        return impl.backward(weight.contiguous(), table, grad_penalty.to(acc), grad_eq.to(acc)).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, grad_penalty, grad_eq = ctx.saved_tensors
        table, impl = ctx.table, ctx.impl
        grad_w = grad_gp = grad_ge = None
        if ctx.needs_input_grad[0]:
            grad_w = _Gradient.apply(grad, grad_penalty, grad_eq, table, impl)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_gp, grad_ge = coefficient_grads(grad, weight, _Project.apply(weight, table, impl), grad_penalty.dtype,
                                                 grad_eq.dtype)
        return grad_w, grad_gp, grad_ge, None, None


class _Project(torch.autograd.Function):
    """P(W) in the weight's dtype; its vector-Jacobian product is P(grad) (P is self-adjoint)."""

    @staticmethod
    def forward(ctx, weight, table, impl):
        ctx.table, ctx.impl = table, impl
        return impl.project(weight.contiguous(), table).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        return _Project.apply(grad, ctx.table, ctx.impl), None, None


def penalty_energy(weight: torch.Tensor, table, impl):
    return _PenaltyEnergy.apply(weight, table, impl)


def project(weight: torch.Tensor, table, impl) -> torch.Tensor:
    return _Project.apply(weight, table, impl)


def spectrum(weight: torch.Tensor, table, impl) -> torch.Tensor:
    # A report, not a training quantity: no autograd node.
    with torch.no_grad():
        return impl.spectrum(weight.detach().contiguous(), table)
