"""The "triton" backend's steerable slot (projkernels/symmetry/steerable.py).

One launch per block type t.  A program takes ``BB`` consecutive blocks of that type and gathers
them straight from the weight (each block's elements sit at ``base[b] + elem[e]``) in steps of
``MC`` elements, so tiles stay small for any block size m (m reaches thousands for 3-D kernels).
A first loop accumulates the coefficients ``C = X Q_t`` ([BB, RP], on chip); a second loop
re-reads each step of X with the matching rows of Q_t (zero-padded to ``RP`` columns) and forms
the projection ``PX = C Q_t^T`` and the residual ``R = X - PX``.  The forward pass writes one (penalty, energy) pair of partial sums per
program (``sum R^2``, ``sum C^2``); PyTorch adds the partials in a fixed order, so the result does
not depend on scheduling.  The write pass stores ``a R + b PX`` at the same addresses: ``a = 0,
b = 1`` is the projection, ``a = 2 g_pen, b = 2 g_eq`` the gradient.  Blocks partition the weight,
so every element is written exactly once.

Matrix products use ``input_precision="ieee"`` (no TF32): the penalty of a nearly equivariant
weight is a small difference and must not carry 1e-3 relative product errors.  Half weights are
read as such and converted to float32 in registers.  Under ``TRITON_INTERPRET=1`` the kernels run
on CPU tensors through Triton's interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...library.autograd import EAGER, Calls, not_stackable
from ...orbits import acc_dtype
from ...symmetry.steerable import SteerableSymmetry, no_spectrum

__all__ = ["SteerableCalls", "bind", "launch_block"]

_BB = 32   # blocks per program
_MC = 64   # block elements per step of the loop over m: tiles stay small for any block size


def launch_block(m: int):
    """(blocks per program, elements per step) for block size m: a function of the problem only, so
    the order of the additions is fixed."""
    return _BB, max(16, min(_MC, triton.next_power_of_2(m)))


@triton.jit
def _chunk(w_ptr, base, rmask, elem_ptr, q_ptr, k0, m, MC: tl.constexpr, RP: tl.constexpr, F64: tl.constexpr):
    """Elements k0 .. k0+MC of the program's blocks ([BB, MC], accumulation dtype), Q_t's rows for
    them ([MC, RP]) and their addresses."""
    e = k0 + tl.arange(0, MC)
    emask = e < m
    elem = tl.load(elem_ptr + e, mask=emask, other=0)
    addr = base[:, None] + elem[None, :]
    mask = rmask[:, None] & emask[None, :]
    x = tl.load(w_ptr + addr, mask=mask, other=0.0)
    if F64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    q = tl.load(q_ptr + e[:, None] * RP + tl.arange(0, RP)[None, :], mask=emask[:, None], other=0.0)
    return x, q, addr, mask


@triton.jit
def _coefficients(w_ptr, base, rmask, elem_ptr, q_ptr, m,
                  BB: tl.constexpr, MC: tl.constexpr, RP: tl.constexpr, F64: tl.constexpr):
    """C = X Q_t for the program's blocks ([BB, RP]): the first pass over the blocks."""
    if F64:
        c = tl.zeros((BB, RP), dtype=tl.float64)
    else:
        c = tl.zeros((BB, RP), dtype=tl.float32)
    for k0 in range(0, m, MC):
        x, q, addr, mask = _chunk(w_ptr, base, rmask, elem_ptr, q_ptr, k0, m, MC, RP, F64)
        c += tl.dot(x, q, input_precision="ieee")
    return c


@triton.jit
def _forward_kernel(w_ptr, base_ptr, elem_ptr, q_ptr, part_ptr, n_blocks, m,
                    BB: tl.constexpr, MC: tl.constexpr, RP: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    rmask = rows < n_blocks
    base = tl.load(base_ptr + rows, mask=rmask, other=0)
    c = _coefficients(w_ptr, base, rmask, elem_ptr, q_ptr, m, BB, MC, RP, F64)
    if F64:
        acc = tl.zeros((BB, MC), dtype=tl.float64)
    else:
        acc = tl.zeros((BB, MC), dtype=tl.float32)
    for k0 in range(0, m, MC):
        x, q, addr, mask = _chunk(w_ptr, base, rmask, elem_ptr, q_ptr, k0, m, MC, RP, F64)
        r = x - tl.dot(c, tl.trans(q), input_precision="ieee")  # the residual; padding gives exact zeros
        acc += r * r
    tl.store(part_ptr + 2 * pid, tl.sum(tl.sum(acc, axis=1), axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(tl.sum(c * c, axis=1), axis=0))


@triton.jit
def _write_kernel(w_ptr, base_ptr, elem_ptr, q_ptr, out_ptr, ab_ptr, n_blocks, m,
                  BB: tl.constexpr, MC: tl.constexpr, RP: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    rmask = rows < n_blocks
    base = tl.load(base_ptr + rows, mask=rmask, other=0)
    c = _coefficients(w_ptr, base, rmask, elem_ptr, q_ptr, m, BB, MC, RP, F64)
    a = tl.load(ab_ptr)
    b = tl.load(ab_ptr + 1)
    for k0 in range(0, m, MC):
        x, q, addr, mask = _chunk(w_ptr, base, rmask, elem_ptr, q_ptr, k0, m, MC, RP, F64)
        px = tl.dot(c, tl.trans(q), input_precision="ieee")
        val = a * (x - px) + b * px
        tl.store(out_ptr + addr, val.to(out_ptr.dtype.element_ty), mask=mask)


class _Padded:
    """Per (symmetry, device, dtype): each type's Q_t zero-padded to [m, RP] (RP >= 16 for tl.dot)."""
    cache = {}

    @classmethod
    def get(cls, sym: SteerableSymmetry, device, acc):
        key = (id(sym), torch.device(device), acc)
        hit = cls.cache.get(key)
        if hit is not None and hit[0] is sym:
            return hit[1]
        lay = sym.layout(device, acc)
        out = []
        for t in lay.types:
            m, r = t.q.shape
            rp = max(16, triton.next_power_of_2(max(r, 1)))
            qp = torch.zeros(m, rp, dtype=acc, device=t.q.device)
            qp[:, :r] = t.q
            n = t.n_blocks
            bb, mc = launch_block(m)
            out.append((qp.contiguous(), t.base, t.elem, n, m, rp, bb, mc))
        cls.cache[key] = (sym, out)
        return out


def _forward(w: torch.Tensor, sym: SteerableSymmetry):
    acc = acc_dtype(w.dtype)
    w = w.contiguous()
    parts = []
    for qp, base, elem, n, m, rp, bb, mc in _Padded.get(sym, w.device, acc):
        if n == 0:
            continue
        grid = triton.cdiv(n, bb)
        part = torch.empty(grid, 2, dtype=acc, device=w.device)
        _forward_kernel[(grid,)](w, base, elem, qp, part, n, m, BB=bb, MC=mc, RP=rp, F64=acc == torch.float64)
        parts.append(part)
    total = torch.cat(parts).sum(0)  # partials added by PyTorch in a fixed order
    return total[0], total[1]


def _write(w: torch.Tensor, sym: SteerableSymmetry, ab: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    acc = acc_dtype(w.dtype)
    w = w.contiguous()
    out = torch.empty(w.shape, dtype=out_dtype, device=w.device)
    ab = ab.to(device=w.device, dtype=acc).contiguous()
    for qp, base, elem, n, m, rp, bb, mc in _Padded.get(sym, w.device, acc):
        if n == 0:
            continue
        _write_kernel[(triton.cdiv(n, bb),)](w, base, elem, qp, out, ab, n, m, BB=bb, MC=mc, RP=rp,
                                             F64=acc == torch.float64)
    return out


_PROJECT_AB = {}


def _project_ab(device, dtype) -> torch.Tensor:
    # (a, b) = (0, 1) resident on the device: no host-to-device copy per call
    key = (torch.device(device), dtype)
    ab = _PROJECT_AB.get(key)
    if ab is None:
        ab = _PROJECT_AB[key] = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
    return ab


class SteerableCalls:
    """A steerable configuration's calls on the Triton backend (library/autograd.py's protocol): the
    forward pass, and the write pass as the gradient (``a = 2 g_pen, b = 2 g_eq``) and as the
    projection (``a = 0, b = 1``)."""
    __slots__ = ("sym",)

    def __init__(self, sym):
        self.sym = sym

    def forward(self, w):
        pen, eq = _forward(w, self.sym)
        return pen, eq, None

    def gradient(self, w, g_pen, g_eq, saved):
        ab = torch.stack([2 * g_pen.reshape(()).to(torch.float64), 2 * g_eq.reshape(()).to(torch.float64)])
        return _write(w, self.sym, ab, w.dtype)

    def project(self, w):
        return _write(w, self.sym, _project_ab(w.device, acc_dtype(w.dtype)), w.dtype)

    def stacked(self):
        raise not_stackable("a steerable symmetry")


def bind(sym, device, dtype):
    return Calls(EAGER.penalty_energy, EAGER.project, no_spectrum), (SteerableCalls(sym),)
