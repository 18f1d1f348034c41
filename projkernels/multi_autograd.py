"""Python autograd for the multi-tensor kernels that are not native ops (the reference route,
a registered Python backend, a single-weight backend applied layer by layer).

The native backends do not come here: their multi-tensor op carries its autograd in C++
(csrc/autograd.cpp).
"""
from __future__ import annotations

import functools

import torch

from .backends import BACKENDS, MultiKernels
from .multi_table import MultiTable
from .orbits import acc_dtype

__all__ = ["MultiPenaltyFunction", "per_layer"]


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


class MultiPenaltyFunction(torch.autograd.Function):
    """(total_penalty, total_eq, penalty [L], eq [L]) through ``kernels``; see multi.multi_penalty."""

    @staticmethod
    def forward(ctx, table: MultiTable, kernels: MultiKernels, buf_dtype: torch.dtype, *weights):
        if kernels.concatenated:
            x = torch.cat([w.detach().reshape(-1).to(buf_dtype) for w in weights])
            ctx.save_for_backward(x)
        else:
            x = [w.detach().contiguous() for w in weights]
            ctx.save_for_backward(*x)
        pen, eq = kernels.forward(x, table)
        ctx.table, ctx.kernels = table, kernels
        ctx.weight_meta = [(w.dtype, w.shape) for w in weights]
        return pen.sum(), eq.sum(), pen, eq

    @staticmethod
    def backward(ctx, g_total_pen, g_total_eq, g_pen, g_eq):
        saved = ctx.saved_tensors
        table = ctx.table
        acc = functools.reduce(torch.promote_types, (acc_dtype(w.dtype) for w in saved))
        dev = saved[0].device

        def coefficient(total, vec):
            # Layer l's weight on this term: the total's gradient plus its own entry's.
            out = torch.zeros(table.n_layers, dtype=acc, device=dev)
            if total is not None:
                out = out + total.to(acc)
            if vec is not None:
                out = out + vec.to(acc)
            return out

        gp, ge = coefficient(g_total_pen, g_pen), coefficient(g_total_eq, g_eq)
        if ctx.kernels.concatenated:
            grad = ctx.kernels.backward(saved[0], table, gp, ge)
            parts = [grad[s:s + n] for s, n in zip(table.starts, table.numels)]
        else:
            parts = ctx.kernels.backward(list(saved), table, gp, ge)
        grads = [None] * len(ctx.weight_meta)
        for i, ((dtype, shape), part) in enumerate(zip(ctx.weight_meta, parts)):
            if ctx.needs_input_grad[3 + i]:
                grads[i] = part.reshape(shape).to(dtype)
        return (None, None, None, *grads)
