"""The equivariance decay as a Triton kernel (the "triton" decay backend).

``target <- target + coef_dev (W - P W) + coef_mean P W`` in place, one launch per tensor: each
program loads ``BLOCK`` orbits as a ``[BLOCK, GP]`` tile (``GP`` = |G| rounded up to a power of two),
takes the orbit means and writes the update back.  All values of a tile are loaded before anything
is stored, so an entry listed several times in its orbit gets the same value each time, and the
in-place update (target = W) reads the old W only.  Math in float32 (float64 for float64 tensors).

The "triton" backend's decay slot; it serves the devices ``kernels.why_unavailable`` allows.
"""
from __future__ import annotations

import contextlib
import numpy as np
import torch
import triton
import triton.language as tl

from .kernels import INTERPRET, _DOWN, _UP, _any_not_finite, _load_orbits, _not_finite, _orbit_mean

__all__ = ["apply"]



@triton.jit
def _decay_kernel(t_ptr, w_ptr, offsets_ptr, n_orbits, opb, c_in, stride_out, stride_in,
                  dev_hi, dev_lo, mean_hi, mean_lo, G: tl.constexpr, GP: tl.constexpr, F64: tl.constexpr, IN_PLACE: tl.constexpr,
                  BLOCK: tl.constexpr, SIGNED: tl.constexpr):
    # The orbit tile and its addresses, loaded as the penalty's kernels load them (f = s W: the
    # update is computed in f's terms and multiplied by s again where it is stored).
    f, _, _, mask, addr, sign = _load_orbits(w_ptr, offsets_ptr, tl.program_id(0), n_orbits, opb, c_in, stride_out,
                                             stride_in, G, GP, F64, BLOCK, SIGNED)
    mean = _orbit_mean(f, G)
    if IN_PLACE:
        old = f
    else:
        old = tl.load(t_ptr + addr, mask=mask, other=0.0).to(f.dtype)
        if SIGNED:
            old = old * sign
    # Scalar arguments arrive as float32: a float64 coefficient comes as hi + lo float32 parts.
    zero = tl.zeros([1], dtype=f.dtype)
    coef_dev = (zero + dev_hi) + dev_lo
    coef_mean = (zero + mean_hi) + mean_lo
    new = old + (coef_dev[:, None] * (f - mean[:, None]) + coef_mean[:, None] * mean[:, None])
    if _any_not_finite(new):
        # f - mean (or a term) overflowed near the largest finite value: on scaled values.
        m_s = (mean * _DOWN)[:, None]
        new = tl.where(_not_finite(new),
                       (old * _DOWN + (coef_dev[:, None] * (f * _DOWN - m_s) + coef_mean[:, None] * m_s)) * _UP, new)
    if SIGNED:
        new = new * sign
    tl.store(t_ptr + addr, new.to(t_ptr.dtype.element_ty), mask=mask)


def _block(n_orbits: int, gp: int) -> int:
    # About 2048 values per program (a tile of 8 to 16 per thread at 4 warps); fewer, larger
    # programs under the interpreter, whose cost is per program.
    tile = 1 << 14 if INTERPRET else 2048
    return max(16, min(triton.next_power_of_2(max(n_orbits, 1)), max(tile // gp, 1)))


def _split(x: float):
    """x as float32 hi + lo: together about 48 bits, enough for float64 math at float64 rounding."""
    hi = float(np.float32(x))
    return hi, float(np.float32(float(x) - hi))


def apply(targets, weights, tables, coef_dev, coef_mean) -> None:
    """The DecayBackend entry: one launch per tensor, in place."""
    for i, (t, table) in enumerate(zip(targets, tables)):
        w = t if weights is None else weights[i]
        G = table.group.order
        gp = triton.next_power_of_2(G)
        n = table.n_orbits
        block = _block(n, gp)
        offsets = table.device_tables(t.device, spectrum=False).offsets
        ctx = torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
        with ctx:
            _decay_kernel[(triton.cdiv(n, block),)](
                t, w, offsets, n, table.orbits_per_block, table.c_in, table.stride_out, table.stride_in,
                *_split(coef_dev[i]), *_split(coef_mean[i]), G=G, GP=gp, F64=t.dtype == torch.float64,
                IN_PLACE=weights is None, BLOCK=block, SIGNED=table.signed, num_warps=4)
