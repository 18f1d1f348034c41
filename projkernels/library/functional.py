"""The torch.func route: ``grad``, ``vjp``, ``jvp`` / forward-mode AD, ``vmap``, ``jacrev`` / ``jacfwd`` and
``functional_call`` over the public functions and ``model_penalty``.

The eager routes cannot run under functorch transforms: the native ops carry C++ autograd (which
functorch cannot see through, and whose kernels read the storage that functorch's wrapper tensors do
not have), and the eager Python nodes have no ``setup_context``, ``jvp`` or ``vmap``.  Checking for a
transform before every call would cost every eager call, so the dispatch points (projkernels/api.py,
``MultiPlan.run`` in projkernels/dispatch/multi.py) call the eager route as before and come here only when it
raised while a transform or a forward-mode dual level is active (``transformed``): the common eager
path pays nothing.

Here three ``torch.autograd.Function`` s act on a stack of N weights of one configuration, shaped
``(N, *shape)``, and call the backend's kernels below autograd:

    _PenaltyEnergy(W)       -> (penalty [N], eq_energy [N])
    _Gradient(W, g_p, g_e)  -> 2 g_p (W - P W) + 2 g_e P W        (the VJP of _PenaltyEnergy)
    _Project(W)             -> P W                                (self-adjoint: its own VJP)

The maps are linear in W (and _Gradient in (g_p, g_e) too), so every derivative rule is one of
these Functions again: double backward, ``jvp`` of a ``grad``, ``hessian`` all stay on this route.
Their ``vmap`` rules fold the vmapped dimension into N and call the same Function once, so a batch of
weights is one kernel call, not a Python loop: for the native backends N > 1 goes through the
multi-tensor kernels (one layer per stack entry, all sharing the table) and ``P`` through the
single-weight kernel on the stack folded into the output-channel dim (fields lie along dim 0, and
orbits never leave a field, so no orbit mixes two stack entries); the reference backend gathers the
orbits of the whole stack with plain batched torch ops.  Other Python backends (triton) have no
batched kernels: their stack entries are run one by one.

Derivatives: penalty' = 2 <W - P W, dW> and eq_energy' = 2 <P W, dW>, both taken from the kernels'
deviations (never from ||W||^2 - ||P W||^2), summed in the accumulation dtype.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.autograd.forward_ad as _fwad

from ..orbits import OrbitTable, _cached_table, acc_dtype

__all__ = ["transformed", "untransformed", "penalty_energy", "project", "multi_penalty"]

_transforms_active = torch._C._are_functorch_transforms_active
# Inside a transform even factory functions return wrapped tensors (no storage): orbit tables and
# kernel calls on plain tensors run with functorch switched off.
untransformed = torch._C._DisableFuncTorch


def transformed() -> bool:
    """True inside a torch.func transform or a ``torch.autograd.forward_ad.dual_level`` (the only
    places where the eager route's error means "take this route")."""
    return _transforms_active() or _fwad._current_level >= 0


def _reps(table: OrbitTable) -> Tuple[str, str]:
    return table.in_rep, table.out_rep


class _Layer:
    """One configuration's kernels applied to a stack ``(N, *shape)`` of its weights, below autograd."""

    __slots__ = ("table", "impl", "reps")

    def __init__(self, table: OrbitTable, impl):
        self.table, self.impl, self.reps = table, impl, _reps(table)

    def folded(self, n: int) -> OrbitTable:
        """The table of the stack folded into dim 0: n times as many output fields."""
        t = self.table
        if n == 1:
            return t
        return _cached_table(t.group, self.reps[0], self.reps[1], (n * t.shape[0],) + tuple(t.shape[1:]))

    def forward(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with untransformed():
            return self._forward(w)

    def backward(self, w: torch.Tensor, gp: torch.Tensor, ge: torch.Tensor) -> torch.Tensor:
        with untransformed():
            return self._backward(w, gp, ge)

    def project(self, w: torch.Tensor) -> torch.Tensor:
        with untransformed():
            return self._project(w)

    def _forward(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n, impl = w.shape[0], self.impl
        if impl.name == "reference":
            return _reference_forward(w.contiguous(), self.table)
        if n == 1:
            p, e = impl.forward(w[0].contiguous(), self.table)
            return p.reshape(1), e.reshape(1)
        if impl.native:
            from ..backends import native
            return native.multi_forward(list(w.contiguous().unbind(0)), [self.table] * n)
        pairs = [impl.forward(x.contiguous(), self.table) for x in w.unbind(0)]  # no batched kernel
        return torch.stack([p for p, _ in pairs]), torch.stack([e for _, e in pairs])

    def _backward(self, w: torch.Tensor, gp: torch.Tensor, ge: torch.Tensor) -> torch.Tensor:
        n, impl = w.shape[0], self.impl
        acc = acc_dtype(w.dtype)
        gp, ge = gp.to(acc), ge.to(acc)
        if impl.name == "reference":
            return _reference_backward(w.contiguous(), self.table, gp, ge).to(w.dtype)
        if n == 1:
            return impl.backward(w[0].contiguous(), self.table, gp[0], ge[0]).to(w.dtype).unsqueeze(0)
        if impl.native:
            from ..backends import native
            return torch.stack(native.multi_backward(list(w.contiguous().unbind(0)), [self.table] * n, gp, ge))
        return torch.stack([impl.backward(x.contiguous(), self.table, a, b).to(w.dtype)
                            for x, a, b in zip(w.unbind(0), gp.unbind(0), ge.unbind(0))])

    def _project(self, w: torch.Tensor) -> torch.Tensor:
        n = w.shape[0]
        if self.impl.name == "reference":
            return _reference_project(w.contiguous(), self.table).to(w.dtype)
        flat = w.contiguous().reshape((n * w.shape[1],) + tuple(w.shape[2:]))
        return self.impl.project(flat, self.folded(n)).to(w.dtype).reshape(w.shape)


# --- the reference backend on a stack: the orbit form of projkernels/backends/reference/finite.py with a leading dim ---

def _orbits(w: torch.Tensor, table: OrbitTable):
    acc = acc_dtype(w.dtype)
    idx = table.gather_index.to(w.device)
    f = w.reshape(w.shape[0], -1)[:, idx].to(acc)          # [N, orbits, |G|]
    if table.signed:
        f = f * table.gather_signs.to(device=w.device, dtype=acc)  # f[g] = s(g, e) W[g . e]
    inv_stab = table.inv_stab.to(device=w.device, dtype=acc).repeat(table.n_blocks)
    return f, f.mean(dim=2, keepdim=True), inv_stab, idx


def _reference_forward(w: torch.Tensor, table: OrbitTable):
    f, mean, inv_stab, _ = _orbits(w, table)
    penalty = (inv_stab * (f - mean).square().sum(dim=2)).sum(dim=1)
    eq_energy = (inv_stab * table.group.order * mean.squeeze(2).square()).sum(dim=1)
    return penalty, eq_energy


def _reference_project(w: torch.Tensor, table: OrbitTable) -> torch.Tensor:
    f, mean, _, idx = _orbits(w, table)
    out = torch.empty(w.shape[0], w[0].numel(), dtype=f.dtype, device=w.device)
    value = mean.expand_as(f)
    if table.signed:
        value = value * table.gather_signs.to(device=w.device, dtype=f.dtype)  # P(W)[g . e] = s(g, e) mean
    out[:, idx.reshape(-1)] = value.reshape(w.shape[0], -1)  # repeated entries carry one value
    return out.reshape(w.shape)


def _reference_backward(w: torch.Tensor, table: OrbitTable, gp: torch.Tensor, ge: torch.Tensor) -> torch.Tensor:
    p = _reference_project(w, table)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return 2 * gp.view(shape) * (w.to(p.dtype) - p) + 2 * ge.view(shape) * p


# --- the Functions ---------------------------------------------------------------------------------

def _fold(x: Optional[torch.Tensor], bdim: Optional[int], size: int) -> torch.Tensor:
    """A vmapped stack (bdim anywhere, or unbatched) as one stack of size * N entries."""
    x = x.expand((size,) + tuple(x.shape)) if bdim is None else x.movedim(bdim, 0)
    return x.reshape((size * x.shape[1],) + tuple(x.shape[2:]))


def _inner(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """<a_i, b_i> per stack entry, in the accumulation dtype."""
    return (a.to(acc) * b.to(acc)).reshape(a.shape[0], -1).sum(dim=1)


def _coefficients(w: torch.Tensor, d: torch.Tensor, layer: _Layer, pen_dtype, eq_dtype):
    """(2 <W - P W, d>, 2 <P W, d>) per entry: the derivatives of (penalty, eq_energy) along d, and
    the gradients of _Gradient with respect to its coefficients.  The first comes from the kernel's
    deviations (2 (W - P W) = _Gradient(W, 1, 0)), not from a difference of energies."""
    acc = acc_dtype(w.dtype)
    ones, zeros = w.new_ones(w.shape[0], dtype=acc), w.new_zeros(w.shape[0], dtype=acc)
    dev2 = _Gradient.apply(w, ones, zeros, layer)
    pw = _Project.apply(w, layer)
    return _inner(dev2, d, acc).to(pen_dtype), (2 * _inner(pw, d, acc)).to(eq_dtype)


class _PenaltyEnergy(torch.autograd.Function):
    @staticmethod
    def forward(w, layer):
        return layer.forward(w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, layer = inputs
        ctx.layer = layer
        ctx.save_for_backward(w)
        ctx.save_for_forward(w)
        ctx.dtypes = (output[0].dtype, output[1].dtype)

    @staticmethod
    def backward(ctx, gp, ge):
        (w,) = ctx.saved_tensors
        return _Gradient.apply(w, gp, ge, ctx.layer), None

    @staticmethod
    def jvp(ctx, dw, _):
        (w,) = ctx.saved_tensors
        return _coefficients(w, dw, ctx.layer, *ctx.dtypes)

    @staticmethod
    def vmap(info, in_dims, w, layer):
        pen, eq = _PenaltyEnergy.apply(_fold(w, in_dims[0], info.batch_size), layer)
        b = info.batch_size
        return (pen.reshape(b, -1), eq.reshape(b, -1)), (0, 0)


class _Gradient(torch.autograd.Function):
    @staticmethod
    def forward(w, gp, ge, layer):
        return layer.backward(w, gp, ge)

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, gp, ge, layer = inputs
        ctx.layer = layer
        ctx.save_for_backward(w, gp, ge)
        ctx.save_for_forward(w, gp, ge)

    @staticmethod
    def backward(ctx, g):
        w, gp, ge = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_w = _Gradient.apply(g, gp, ge, ctx.layer) if needs[0] else None
        grad_gp = grad_ge = None
        if needs[1] or needs[2]:
            grad_gp, grad_ge = _coefficients(w, g, ctx.layer, gp.dtype, ge.dtype)
        return grad_w, grad_gp, grad_ge, None

    @staticmethod
    def jvp(ctx, dw, dgp, dge, _):
        # Linear in W and in (g_p, g_e): the tangent is the same map applied to each tangent.
        w, gp, ge = ctx.saved_tensors
        out = None
        if dw is not None:
            out = _Gradient.apply(dw, gp, ge, ctx.layer)
        if dgp is not None or dge is not None:
            dgp = torch.zeros_like(gp) if dgp is None else dgp
            dge = torch.zeros_like(ge) if dge is None else dge
            t = _Gradient.apply(w, dgp, dge, ctx.layer)
            out = t if out is None else out + t
        return out if out is not None else torch.zeros_like(w)

    @staticmethod
    def vmap(info, in_dims, w, gp, ge, layer):
        b = info.batch_size
        out = _Gradient.apply(_fold(w, in_dims[0], b), _fold(gp, in_dims[1], b), _fold(ge, in_dims[2], b), layer)
        return out.reshape((b, -1) + tuple(out.shape[1:])), 0


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(w, layer):
        return layer.project(w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.layer = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return _Project.apply(g, ctx.layer), None  # P is self-adjoint

    @staticmethod
    def jvp(ctx, dw, _):
        return _Project.apply(dw, ctx.layer)      # and linear

    @staticmethod
    def vmap(info, in_dims, w, layer):
        b = info.batch_size
        out = _Project.apply(_fold(w, in_dims[0], b), layer)
        return out.reshape((b, -1) + tuple(out.shape[1:])), 0


# --- the entry points of the dispatch hooks ----------------------------------------------------------

def _layer_of(cfg) -> _Layer:
    if not isinstance(cfg.table, OrbitTable):
        raise NotImplementedError(
            "projkernels: torch.func transforms and forward-mode AD are supported for finite groups; a steerable "
            "symmetry's ops have reverse-mode autograd only (call them outside the transform)")
    return _Layer(cfg.table, cfg.backend)


def penalty_energy(weight: torch.Tensor, cfg):
    """``(penalty, eq_energy)`` of one weight of configuration ``cfg`` (projkernels/dispatch/config.py)."""
    pen, eq = _PenaltyEnergy.apply(weight.unsqueeze(0), _layer_of(cfg))
    return pen.squeeze(0), eq.squeeze(0)


def project(weight: torch.Tensor, cfg) -> torch.Tensor:
    return _Project.apply(weight.unsqueeze(0), _layer_of(cfg)).squeeze(0)


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
        p, e = _PenaltyEnergy.apply(w.reshape(table.shape).unsqueeze(0), _Layer(table, impl))
        pens.append(p.to(plan.acc))
        eqs.append(e.to(plan.acc))
    pen, eq = torch.cat(pens), torch.cat(eqs)
    return pen.sum(), eq.sum(), pen, eq
