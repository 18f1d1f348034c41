"""Python autograd for the multi-tensor kernels that are not native ops (the reference route,
a registered Python backend, a single-weight backend applied layer by layer).

The native backends do not come here: their multi-tensor op carries its autograd in C++
(csrc/autograd/autograd.cpp).

Double backward: the gradient 2 gp_l (W_l - P W_l) + 2 ge_l P W_l is linear in the weights (the
same map applied to the incoming gradient) and in the coefficients (gp, ge) (with coefficients
2 <G_l, W_l - P W_l> and 2 <G_l, P W_l>), so it is a node of its own (``MultiGradientFunction``)
whose backward calls the same kernels again; ``create_graph=True`` then gives the Hessian 2 (I - P)
of every route that comes here, as the native op's C++ autograd does.
"""
from __future__ import annotations

import functools

import torch

from ..backends.registry import BACKENDS, MultiKernels
from ..orbits import acc_dtype

__all__ = ["MultiPenaltyFunction", "MultiGradientFunction", "per_layer"]


@functools.lru_cache(maxsize=None)
def _per_layer(name: str, backend_id: int) -> MultiKernels:
    single = BACKENDS[name]

    def forward(weights, table):
        acc = functools.reduce(torch.promote_types, (acc_dtype(w.dtype) for w in weights))
        pairs = [single.forward(w, t) for w, t in zip(weights, table.tables)]
        return torch.stack([p.to(acc) for p, _ in pairs]), torch.stack([e.to(acc) for _, e in pairs])

    def backward(weights, table, grad_penalty, grad_eq):
        out = []
        for w, t, gp, ge in zip(weights, table.tables, grad_penalty.unbind(), grad_eq.unbind()):
            acc = acc_dtype(w.dtype)
            out.append(single.backward(w, t, gp.to(acc), ge.to(acc)))
        return out

    return MultiKernels(forward, backward, concatenated=False)


def per_layer(name: str) -> MultiKernels:
    """A single-weight backend applied weight by weight (no concatenation).

    For a backend with a single-weight kernel but no multi-tensor one: launches grow with the
    number of layers, but each is a fused pass, which beats the gather-based reference route.
    """
    return _per_layer(name, id(BACKENDS[name]))


def _kernel_input(kernels: MultiKernels, tensors, buf_dtype: torch.dtype):
    """What ``kernels`` read: the tensors concatenated into one ``buf_dtype`` buffer, or the list of
    contiguous tensors (detached: the autograd nodes here define the derivatives)."""
    if kernels.concatenated:
        return torch.cat([t.detach().reshape(-1).to(buf_dtype) for t in tensors])
    return [t.detach().contiguous() for t in tensors]


def _acc_of(tensors) -> torch.dtype:
    return functools.reduce(torch.promote_types, (acc_dtype(t.dtype) for t in tensors))


class MultiPenaltyFunction(torch.autograd.Function):
    """(total_penalty, total_eq, penalty [L], eq [L]) through ``kernels``; see multi.multi_penalty."""

    @staticmethod
    def forward(ctx, table, kernels: MultiKernels, buf_dtype: torch.dtype, *weights):
        x = _kernel_input(kernels, weights, buf_dtype)
        # The weights themselves are saved as well as the kernels' input: the gradient node of the
        # backward takes them as inputs, so that a backward with create_graph=True reaches them.
        if kernels.concatenated:
            ctx.save_for_backward(x, *weights)
        else:
            ctx.save_for_backward(*weights)
            ctx.x = x  # detached views of the saved weights (the same storage), not copies
        pen, eq = kernels.forward(x, table)
        ctx.table, ctx.kernels, ctx.buf_dtype = table, kernels, buf_dtype
        return pen.sum(), eq.sum(), pen, eq

    @staticmethod
    def backward(ctx, g_total_pen, g_total_eq, g_pen, g_eq):
        saved = ctx.saved_tensors
        x, weights = (saved[0], saved[1:]) if ctx.kernels.concatenated else (ctx.x, saved)
        table = ctx.table
        acc = _acc_of(weights)
        dev = weights[0].device

        def coefficient(total, vec):
            # Layer l's weight on this term: the total's gradient plus its own entry's.
            out = torch.zeros(table.n_layers, dtype=acc, device=dev)
            if total is not None:
                out = out + total.to(acc)
            if vec is not None:
                out = out + vec.to(acc)
            return out

        gp, ge = coefficient(g_total_pen, g_pen), coefficient(g_total_eq, g_eq)
        if torch.is_grad_enabled():  # create_graph=True: the gradient as a node of its own
            grads = MultiGradientFunction.apply(table, ctx.kernels, ctx.buf_dtype, x, gp, ge, *weights)
        else:  # the usual first-order backward: no node to record, so none of its host cost
            grads = _gradient_parts(table, ctx.kernels, x, gp, ge, weights)
        return (None, None, None, *(g if ctx.needs_input_grad[3 + i] else None for i, g in enumerate(grads)))


class MultiGradientFunction(torch.autograd.Function):
    """Per weight 2 gp_l (W_l - P W_l) + 2 ge_l P W_l, in the weight's dtype, from the kernels'
    input ``x`` (``_kernel_input`` of ``weights``); differentiable again in the weights and in
    (gp, ge), to any order."""

    @staticmethod
    def forward(ctx, table, kernels: MultiKernels, buf_dtype: torch.dtype, x, gp, ge, *weights):
        ctx.save_for_backward(gp, ge, *weights)
        ctx.table, ctx.kernels, ctx.buf_dtype, ctx.x = table, kernels, buf_dtype, x
        return tuple(_gradient_parts(table, kernels, x, gp, ge, weights))

    @staticmethod
    def backward(ctx, *grads):
        gp, ge, *weights = ctx.saved_tensors
        table, kernels, buf_dtype = ctx.table, ctx.kernels, ctx.buf_dtype
        n = len(weights)
        grad_gp = grad_ge = None
        grad_w = [None] * n
        if any(ctx.needs_input_grad[6:]):
            # Linear in W: the same map applied to the incoming gradient.
            grad_w = list(MultiGradientFunction.apply(table, kernels, buf_dtype, _kernel_input(kernels, grads, buf_dtype),
                                                      gp, ge, *grads))
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            # Linear in (gp_l, ge_l) with coefficients 2 (W_l - P W_l) and 2 P W_l; P W from the same node
            # (gp = 0, ge = 1/2), so that these terms are differentiable in W too.
            acc = _acc_of(weights)
            zero, half = torch.zeros_like(gp), torch.full_like(ge, 0.5)
            pws = MultiGradientFunction.apply(table, kernels, buf_dtype, ctx.x, zero, half, *weights)
            dev, eq = [], []
            for g, w, pw in zip(grads, weights, pws):
                g, w, pw = g.to(acc), w.to(acc), pw.to(acc)
                dev.append((2 * g * (w - pw)).sum())
                eq.append((2 * g * pw).sum())
            grad_gp, grad_ge = torch.stack(dev).to(gp.dtype), torch.stack(eq).to(ge.dtype)
        return (None, None, None, None, grad_gp, grad_ge, *grad_w)


def _gradient_parts(table, kernels: MultiKernels, x, gp, ge, weights):
    """The kernels' backward over ``x``, cut into the weights' shapes and dtypes."""
    gp, ge = gp.detach(), ge.detach()
    if kernels.concatenated:
        grad = kernels.backward(x, table, gp, ge)
        parts = [grad[s:s + n] for s, n in zip(table.starts, table.numels)]
    else:
        parts = kernels.backward(list(x), table, gp, ge)
    return [part.reshape(w.shape).to(w.dtype) for w, part in zip(weights, parts)]
