"""The Python autograd of the penalty family, written once for every Python route.

Three ``torch.autograd.Function`` s act through a ``calls`` object that a backend binds to a
configuration: on one weight (the eager route of the "reference" and "triton" backends and any
registered Python backend: a finite group's orbit table, or a steerable symmetry's layout), or on a
stack ``(N, *shape)`` of weights of one finite configuration (the torch.func route,
projkernels/library/functional.py, whose calls have ``stack = True``):

    calls.forward(W)                   -> (penalty, eq_energy, saved)   accumulation dtype; [N] on a stack
    calls.gradient(W, g_p, g_e, saved) -> 2 g_p (W - P W) + 2 g_e P W   weight's dtype
    calls.project(W)                   -> P W                           weight's dtype
    calls.stacked()                    -> the same configuration's calls on a stack (vmap folds into it)

``saved`` is whatever the forward computed that the gradient may reuse (the reference steerable
route keeps its P W tiles), or None.  The gradient is linear in W (the same map applied to the
incoming gradient) and in (g_p, g_e) (coefficients 2 (W - P W) and 2 P W), and P is self-adjoint and
linear, so every derivative rule -- backward, ``jvp`` (forward-mode AD), the gradients of the
coefficients -- is one of these Functions again: double backward, ``jvp`` of a ``grad`` and
``hessian`` work to any order.  Their ``vmap`` rules fold the vmapped dimension into a stack and
call the same Function once on ``calls.stacked()``, so a batch of weights is one kernel call.

The compiled backends bind public C++ ops instead (their autograd is written once in C++:
csrc/autograd/autograd.cpp); under torch.compile the calls go through projkernels/library/custom_ops.py.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _fwad

from ..orbits import acc_dtype

__all__ = ["Calls", "penalty_energy", "project", "spectrum", "coefficient_grads", "not_stackable", "FiniteCalls",
           "StackCalls", "untransformed", "EAGER"]


class Calls(NamedTuple):
    """What a configuration calls, each ``f(weight, *op_args)``."""
    penalty_energy: object
    project: object
    spectrum: object


def _inner(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, stack: bool) -> torch.Tensor:
    """<a, b> in the accumulation dtype: one per stack entry on a stack, else a 0-dim sum."""
    prod = a.to(acc) * b.to(acc)
    return prod.reshape(a.shape[0], -1).sum(dim=1) if stack else prod.sum()


def coefficient_grads(grad, weight, pw, pen_dtype, eq_dtype, stack: bool = False):
    """The gradients of dW = 2 g_pen (W - P W) + 2 g_eq P W with respect to (g_pen, g_eq), given the
    incoming ``grad`` and P W: 2 <grad, W - P W> and 2 <grad, P W>, formed in the accumulation dtype
    from the deviations W - P W (never from a difference of energies); per entry on a stack."""
    acc = acc_dtype(weight.dtype)
    dev = weight.to(acc) - pw.to(acc)
    return (2 * _inner(grad, dev, acc, stack)).to(pen_dtype), (2 * _inner(grad, pw, acc, stack)).to(eq_dtype)


def _coefficients(weight, direction, calls, pen_dtype, eq_dtype):
    """(2 <W - P W, d>, 2 <P W, d>): the derivatives of (penalty, eq_energy) along d, which are also
    the gradients of _Gradient with respect to its coefficients.  2 (W - P W) is the kernel's own
    (_Gradient with coefficients (1, 0)): for a half weight, W - round(P W) would drown a deviation of
    a few ulps in the rounding of P W.  Both through the Functions, so that they are differentiable
    again."""
    stack = getattr(calls, "stack", False)
    acc = acc_dtype(weight.dtype)
    n = (weight.shape[0],) if stack else ()
    dev2 = _gradient(weight, weight.new_ones(n, dtype=acc), weight.new_zeros(n, dtype=acc), calls, None)
    pw = _project(weight, calls)
    return (_inner(direction, dev2, acc, stack).to(pen_dtype),
            (2 * _inner(direction, pw, acc, stack)).to(eq_dtype))


def _fold(x: Optional[torch.Tensor], bdim: Optional[int], size: int, stack: bool) -> torch.Tensor:
    """A vmapped argument as the leading dim of one stack: the batch dim moved to the front (or the
    unbatched argument expanded), then merged with the stack dim the calls already had."""
    x = x.expand((size,) + tuple(x.shape)) if bdim is None else x.movedim(bdim, 0)
    return x.reshape((size * x.shape[1],) + tuple(x.shape[2:])) if stack else x


def _unfold(out: torch.Tensor, size: int, stack: bool) -> torch.Tensor:
    """A stack result of the folded call back in the vmapped layout (batch dim in front)."""
    return out.reshape((size, -1) + tuple(out.shape[1:])) if stack else out


class _Saved:
    """Hands the forward's reusable work to ``setup_context`` (a Function's forward has no ctx)."""
    __slots__ = ("value",)

    def __init__(self):
        self.value = None


class _PenaltyEnergy(torch.autograd.Function):
    """(penalty, eq_energy) in the accumulation dtype."""

    @staticmethod
    def forward(weight, calls, box):
        pen, eq, box.value = calls.forward(weight)
        return pen, eq

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, calls, box = inputs
        ctx.calls, ctx.saved, box.value = calls, box.value, None
        ctx.dtypes = (output[0].dtype, output[1].dtype)
        ctx.save_for_backward(weight)
        ctx.save_for_forward(weight)

    @staticmethod
    def backward(ctx, grad_penalty, grad_eq):
        (weight,) = ctx.saved_tensors
        return _gradient(weight, grad_penalty, grad_eq, ctx.calls, ctx.saved), None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        (weight,) = ctx.saved_tensors
        return _coefficients(weight, tangent, ctx.calls, *ctx.dtypes)

    @staticmethod
    def vmap(info, in_dims, weight, calls, box):
        b, stack = info.batch_size, getattr(calls, "stack", False)
        pen, eq = _penalty_energy(_fold(weight, in_dims[0], b, stack), calls.stacked(), _Saved())
        return (_unfold(pen, b, stack), _unfold(eq, b, stack)), (0, 0)


class _Gradient(torch.autograd.Function):
    """2 grad_penalty (W - P W) + 2 grad_eq P W in the weight's dtype (differentiable again).
    ``saved`` (the forward's reusable work, or None) only saves time; autograd does not see it."""

    @staticmethod
    def forward(weight, grad_penalty, grad_eq, calls, saved):
        return calls.gradient(weight, grad_penalty, grad_eq, saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, grad_penalty, grad_eq, calls, _ = inputs
        ctx.calls = calls
        ctx.save_for_backward(weight, grad_penalty, grad_eq)
        ctx.save_for_forward(weight, grad_penalty, grad_eq)

    @staticmethod
    def backward(ctx, grad):
        weight, grad_penalty, grad_eq = ctx.saved_tensors
        calls, needs = ctx.calls, ctx.needs_input_grad
        grad_w = grad_gp = grad_ge = None
        if needs[0]:
            grad_w = _gradient(grad, grad_penalty, grad_eq, calls, None)
        if needs[1] or needs[2]:
            grad_gp, grad_ge = _coefficients(weight, grad, calls, grad_penalty.dtype, grad_eq.dtype)
        return grad_w, grad_gp, grad_ge, None, None

    @staticmethod
    def jvp(ctx, d_weight, d_gp, d_ge, *_):
        # Linear in W and in (g_p, g_e): the tangent is the same map applied to each tangent.
        weight, grad_penalty, grad_eq = ctx.saved_tensors
        out = None
        if d_weight is not None:
            out = _gradient(d_weight, grad_penalty, grad_eq, ctx.calls, None)
        if d_gp is not None or d_ge is not None:
            d_gp = torch.zeros_like(grad_penalty) if d_gp is None else d_gp
            d_ge = torch.zeros_like(grad_eq) if d_ge is None else d_ge
            t = _gradient(weight, d_gp, d_ge, ctx.calls, None)
            out = t if out is None else out + t
        return out if out is not None else torch.zeros_like(weight)

    @staticmethod
    def vmap(info, in_dims, weight, grad_penalty, grad_eq, calls, saved):
        b, stack = info.batch_size, getattr(calls, "stack", False)
        out = _gradient(_fold(weight, in_dims[0], b, stack), _fold(grad_penalty, in_dims[1], b, stack),
                              _fold(grad_eq, in_dims[2], b, stack), calls.stacked(), None)
        return _unfold(out, b, stack), 0


class _Project(torch.autograd.Function):
    """P(W) in the weight's dtype; its vector-Jacobian product is P(grad) (P is self-adjoint) and its
    tangent P(dW) (P is linear)."""

    @staticmethod
    def forward(weight, calls):
        return calls.project(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.calls = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _project(grad, ctx.calls), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _project(tangent, ctx.calls)

    @staticmethod
    def vmap(info, in_dims, weight, calls):
        b, stack = info.batch_size, getattr(calls, "stack", False)
        return _unfold(_project(_fold(weight, in_dims[0], b, stack), calls.stacked()), b, stack), 0


# torch binds a Function's arguments with inspect.signature on every apply when it has a
# setup_context; a signature stored on forward is read back at once (inspect's first lookup).
for _fn in (_PenaltyEnergy, _Gradient, _Project):
    _fn.forward.__signature__ = inspect.signature(_fn.forward)
del _fn


# The same rules in the two other forms torch needs, as subclasses that change how they are applied,
# not what they compute:
# - eager calls outside any transform take the ctx-style form (forward(ctx, ...) runs the rule's
#   forward and setup_context): torch binds the arguments of a Function with a setup_context through
#   inspect on every apply, tens of microseconds that the eager route would pay per call;
# - torch.compile (Dynamo) refuses to trace a Function that defines a jvp rule, so the routes it
#   traces (a steerable symmetry on a Python backend) take the rules less jvp (a compiled graph is
#   differentiated in reverse mode).
# Inside torch.func transforms and forward-mode AD the rules themselves run.
def _eager_form(rule):
    def forward(ctx, *args):
        out = rule.forward(*args)
        rule.setup_context(ctx, args, out)
        return out
    return staticmethod(forward)


class _EagerPenaltyEnergy(_PenaltyEnergy):
    forward = _eager_form(_PenaltyEnergy)
    setup_context = torch.autograd.Function.setup_context


class _EagerGradient(_Gradient):
    forward = _eager_form(_Gradient)
    setup_context = torch.autograd.Function.setup_context


class _EagerProject(_Project):
    forward = _eager_form(_Project)
    setup_context = torch.autograd.Function.setup_context


class _TracedPenaltyEnergy(_PenaltyEnergy):
    jvp = torch.autograd.Function.jvp


class _TracedGradient(_Gradient):
    jvp = torch.autograd.Function.jvp


class _TracedProject(_Project):
    jvp = torch.autograd.Function.jvp


_transforms_active = torch._C._are_functorch_transforms_active


def _form(rule, eager, traced):
    if torch.compiler.is_compiling():
        return traced
    if _transforms_active() or _fwad._current_level >= 0:
        return rule
    return eager


def _penalty_energy(*args):
    return _form(_PenaltyEnergy, _EagerPenaltyEnergy, _TracedPenaltyEnergy).apply(*args)


def _gradient(*args):
    return _form(_Gradient, _EagerGradient, _TracedGradient).apply(*args)


def _project(*args):
    return _form(_Project, _EagerProject, _TracedProject).apply(*args)


def penalty_energy(weight: torch.Tensor, calls):
    return _penalty_energy(weight, calls, _Saved())


def project(weight: torch.Tensor, calls) -> torch.Tensor:
    return _project(weight, calls)


def spectrum(weight: torch.Tensor, calls) -> torch.Tensor:
    # A report, not a training quantity: no autograd node.
    with torch.no_grad():
        return calls.spectrum(weight.detach())


def not_stackable(what: str):
    """The ``stacked()`` of calls that have no batched form: a vmap over them raises this (a
    RuntimeError, which sends the dispatch points to the torch.func route, or tells the user)."""
    return NotImplementedError(
        f"projkernels: {what} has no batched form under torch.func.vmap; torch.func transforms and "
        "forward-mode AD are supported for finite groups (a steerable symmetry's ops: call them outside vmap)")


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

    def stacked(self) -> "StackCalls":
        return StackCalls(self.table, self.impl)


# Inside a transform even factory functions return wrapped tensors (no storage): the stack's kernel
# calls run on plain tensors with functorch switched off.
untransformed = torch._C._DisableFuncTorch


class StackCalls:
    """One finite configuration's kernels on a stack ``(N, *shape)`` of its weights, below autograd
    and functorch (results per entry): the backend's ``StackKernels`` where it has them (one call
    for the whole stack), else its single-weight kernels entry by entry; a stack of one takes the
    single-weight kernels."""
    __slots__ = ("table", "impl")
    stack = True

    def __init__(self, table, impl):
        self.table, self.impl = table, impl

    def stacked(self) -> "StackCalls":
        return self  # a vmap over a stack folds into the same stack

    def forward(self, w):
        with untransformed():
            n, impl, w = w.shape[0], self.impl, w.contiguous()
            if n > 1 and impl.stack is not None:
                pen, eq = impl.stack.forward(w, self.table)
            else:
                pairs = [impl.forward(x, self.table) for x in w.unbind(0)]
                pen, eq = torch.stack([p for p, _ in pairs]), torch.stack([e for _, e in pairs])
            return pen, eq, None

    def gradient(self, w, gp, ge, saved):
        with untransformed():
            n, impl, w = w.shape[0], self.impl, w.contiguous()
            acc = acc_dtype(w.dtype)
            gp, ge = gp.to(acc), ge.to(acc)
            if n > 1 and impl.stack is not None:
                return impl.stack.backward(w, self.table, gp, ge).to(w.dtype)
            return torch.stack([impl.backward(x, self.table, a, b).to(w.dtype)
                                for x, a, b in zip(w.unbind(0), gp.unbind(0), ge.unbind(0))])

    def project(self, w):
        with untransformed():
            n, impl, w = w.shape[0], self.impl, w.contiguous()
            if n > 1 and impl.stack is not None and impl.stack.project is not None:
                return impl.stack.project(w, self.table).to(w.dtype)
            # One call on the stack folded into the output-channel dim: fields lie along dim 0 and
            # orbits never leave a field, so no orbit mixes two stack entries.
            flat = w.reshape((n * w.shape[1],) + tuple(w.shape[2:]))
            return impl.project(flat, folded(self.table, n)).to(w.dtype).reshape(w.shape)


def folded(table, n: int):
    """``table`` for a stack of n weights folded into dim 0: n times as many output fields, the same
    orbits (cached on the table, so its device copies are uploaded once)."""
    if n == 1:
        return table
    cache = table.__dict__.setdefault("_folded", {})
    if n not in cache and len(cache) >= 8:
        cache.clear()  # bounded: each folded table keeps its own device copies
    if n not in cache:
        cache[n] = dataclasses.replace(table, shape=(n * table.shape[0],) + tuple(table.shape[1:]),
                                       c_out=n * table.c_out)
    return cache[n]


EAGER = Calls(penalty_energy, project, spectrum)
