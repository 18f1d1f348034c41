"""The reference route of steerable symmetries (projkernels/symmetry/steerable.py): block types of
equal size batched, one gather and two batched matmuls per group; the gradient is one write pass
from the forward's P W (kept: it saves the two matrix products again, half the work).

Penalty per block from the residual's squared norm (never ||W||^2 - ||Q^T W||^2).  The autograd is
projkernels/library/autograd.py's; ``SteerableCalls`` is what it calls.
"""
from __future__ import annotations

import torch

from ...library.autograd import EAGER, Calls, not_stackable, penalty_energy, project
from ...orbits import acc_dtype
from ...symmetry.steerable import GroupLayout, Layout, Member, no_spectrum

__all__ = ["SteerableCalls", "bind", "reference_penalty_energy", "reference_project"]

def _blocks(w3: torch.Tensor, mb: Member) -> torch.Tensor:
    """The [n_out, n_in, d_out, d_in, S] view of a type's blocks in ``w3`` ([C_out, C_in, S]): evenly
    spaced fields are windows of an unfold (plain views, so torch.compile traces them)."""
    n_o, n_i, d_o, d_i, _ = mb.view
    o0, so, i0, si = mb.strided
    v = w3.narrow(0, o0, (n_o - 1) * so + d_o).unfold(0, d_o, max(so, 1))       # [n_o, C_in, S, d_o]
    v = v.narrow(1, i0, (n_i - 1) * si + d_i).unfold(1, d_i, max(si, 1))        # [n_o, n_i, S, d_o, d_i]
    return v.permute(0, 1, 3, 4, 2)


def _flat(w3: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # W flattened in ``acc`` plus one zero that padding indices point at
    return torch.cat([w3.reshape(-1).to(acc), w3.new_zeros(1, dtype=acc)])


def _gather(w3: torch.Tensor, g: GroupLayout, acc: torch.dtype, flat=None) -> torch.Tensor:
    """The group's blocks as a [T, n_blocks_max, m] tile in ``acc`` (the copy converts half types)."""
    if g.index is not None:
        flat = _flat(w3, acc) if flat is None else flat
        return flat[g.index].view(len(g.members), g.n_blocks, g.m)
    x = (torch.zeros if g.padded else torch.empty)(len(g.members), g.n_blocks, g.m, dtype=acc, device=w3.device)
    for j, mb in enumerate(g.members):
        x[j, :mb.n_blocks].view(mb.view).copy_(_blocks(w3, mb))
    return x


def _scatter(buf: torch.Tensor, shape3, g: GroupLayout, val: torch.Tensor) -> None:
    """Write a [T, n_blocks_max, m] tile back to the blocks' places in ``buf`` (W flattened plus one
    element that padding writes land on)."""
    if g.index is not None:
        buf.index_put_((g.index,), val.reshape(-1))
        return
    out3 = buf[:-1].view(shape3)
    for j, mb in enumerate(g.members):
        _blocks(out3, mb).copy_(val[j, :mb.n_blocks].view(mb.view))


def _pieces(w3: torch.Tensor, g: GroupLayout, acc: torch.dtype, flat=None):
    """(X, C, PX) of one group: the blocks, their coefficients C = X Q_t and projections C Q_t^T."""
    x = _gather(w3, g, acc, flat)              # [T, n_blocks, m]
    c = torch.bmm(x, g.q)                # [T, n_blocks, r]
    return x, c, torch.bmm(c, g.q.transpose(1, 2))


def _write(lay: Layout, weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """P W shaped and typed like ``weight`` (every element is written once: the blocks partition W)."""
    w3 = weight.reshape(lay.shape3)
    buf = torch.empty(lay.numel + 1, dtype=acc, device=weight.device)
    flat = _flat(w3, acc) if lay.flat else None
    for g in lay.groups:
        _, _, px = _pieces(w3, g, acc, flat)
        _scatter(buf, lay.shape3, g, px)
    return buf[:-1].reshape(weight.shape).to(weight.dtype)



def _ref_gradient(weight, sym, g_pen, g_eq, pxs=None) -> torch.Tensor:
    """2 g_pen (W - P W) + 2 g_eq P W in the accumulation dtype; ``pxs``: the groups' P W tiles when
    the caller holds them, else they are formed here."""
    acc = acc_dtype(weight.dtype)
    lay = sym.layout(weight.device, acc)
    a, b = 2 * g_pen.to(acc), 2 * (g_eq.to(acc) - g_pen.to(acc))
    if pxs is None:
        w3 = weight.reshape(lay.shape3)
        flat = _flat(w3, acc) if lay.flat else None
        pxs = [_pieces(w3, g, acc, flat)[2] for g in lay.groups]
    # W's own term is elementwise; only P W needs the block scatter.
    buf = torch.empty(lay.numel + 1, dtype=acc, device=weight.device)
    for g, px in zip(lay.groups, pxs):
        _scatter(buf, lay.shape3, g, b * px)
    return buf[:-1].reshape(weight.shape).add_(weight.to(acc) * a)


class SteerableCalls:
    """A steerable configuration's calls on the reference backend (library/autograd.py's protocol)."""
    __slots__ = ("sym",)

    def __init__(self, sym):
        self.sym = sym

    def forward(self, weight):
        acc = acc_dtype(weight.dtype)
        lay = self.sym.layout(weight.device, acc)
        w3 = weight.reshape(lay.shape3)
        flat = _flat(w3, acc) if lay.flat else None
        pen = eq = None
        pxs = []
        for g in lay.groups:
            x, c, px = _pieces(w3, g, acc, flat)
            p, e = (x - px).square().sum(), c.square().sum()
            pen = p if pen is None else pen + p
            eq = e if eq is None else eq + e
            pxs.append(px)
        return pen, eq, pxs

    def gradient(self, weight, g_pen, g_eq, pxs):
        return _ref_gradient(weight, self.sym, g_pen, g_eq, pxs).to(weight.dtype)

    def project(self, weight):
        acc = acc_dtype(weight.dtype)
        return _write(self.sym.layout(weight.device, acc), weight, acc)

    def stacked(self):
        raise not_stackable("a steerable symmetry")


def bind(sym, device, dtype):
    return Calls(EAGER.penalty_energy, EAGER.project, no_spectrum), (SteerableCalls(sym),)


def reference_penalty_energy(weight: torch.Tensor, sym):
    return penalty_energy(weight, SteerableCalls(sym))


def reference_project(weight: torch.Tensor, sym) -> torch.Tensor:
    return project(weight, SteerableCalls(sym))
