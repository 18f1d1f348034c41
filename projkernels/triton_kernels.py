"""Triton kernels over orbit tables: one fused reduction pass and one fused write pass.

Each program takes ``BLOCK`` consecutive orbits (global id = block * orbits_per_block + orbit) and
loads them as a ``[BLOCK, GP]`` tile, ``GP`` the group order rounded up to a power of two, so every
weight entry is read from memory once and the whole orbit is in registers: mean, deviations,
penalty, energy and the isotypic energies come from the same tile.

The reduction is two-staged so that it is deterministic and never waits on the host: stage one
writes one row of partial sums per program, stage two (a single program) adds the rows in a fixed
order.  The launch configuration (``BLOCK`` and the warp count) fixes both the partition of the
sum and the order of the additions inside a program (Triton's reductions follow the tile's
layout), so it is a function of the problem alone (``launch_config``), never timed: every process
and every GPU of one architecture reduces in the same order and gets the same bits, and the write
pass, whose orbit means are reductions too, writes the same bits as well.  Any group order works:
the tile shrinks to 16 orbits as ``GP`` grows.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "launch_config", "reduce_orbits", "apply_orbits"]

# triton.jit picks the interpreter when it decorates, so the mode is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# A tile of about this many values keeps 16 values per thread at 4 warps: enough loads in flight
# to hide latency, few enough registers not to spill.
_TILE = 2048
_MIN_BLOCK, _MAX_BLOCK = 16, 1024
_NUM_WARPS = 4


def launch_config(group_order: int):
    """(BLOCK, num_warps) for a group order: orbits per program and warps, fixed per problem."""
    gp = triton.next_power_of_2(group_order)
    block = max(_MIN_BLOCK, min(_MAX_BLOCK, _TILE // gp))
    return block, _NUM_WARPS


@triton.jit
def _load_orbits(w_ptr, offsets_ptr, pid, n_orbits, opb, c_in, stride_out, stride_in,
                 G: tl.constexpr, GP: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    """The [BLOCK, GP] tile of orbit values in the accumulation dtype, plus indexing helpers."""
    ids = pid * BLOCK + tl.arange(0, BLOCK)
    valid = ids < n_orbits
    b = ids // opb
    o = ids - b * opb
    fo = b // c_in
    fi = b - fo * c_in
    # 64-bit addresses: a large weight can pass 2**31 entries even though its orbit count does not.
    base = fo.to(tl.int64) * stride_out + fi.to(tl.int64) * stride_in
    g = tl.arange(0, GP)
    mask = valid[:, None] & (g < G)[None, :]
    off = tl.load(offsets_ptr + o[:, None] * G + g[None, :], mask=mask, other=0)
    addr = base[:, None] + off.to(tl.int64)
    f = tl.load(w_ptr + addr, mask=mask, other=0.0)
    if F64:
        f = f.to(tl.float64)
    else:
        f = f.to(tl.float32)
    return f, o, valid, mask, addr


@triton.jit
def _reduce_kernel(w_ptr, offsets_ptr, inv_stab_ptr, basis_ptr, row_irrep_ptr, part_ptr,
                   n_orbits, opb, c_in, stride_out, stride_in,
                   G: tl.constexpr, GP: tl.constexpr, N_COLS: tl.constexpr, COLS_P: tl.constexpr,
                   SPECTRUM: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    f, o, valid, mask, addr = _load_orbits(w_ptr, offsets_ptr, pid, n_orbits, opb, c_in, stride_out,
                                           stride_in, G, GP, F64, BLOCK)
    mean = tl.sum(f, axis=1) / G
    dev = tl.where(mask, f - mean[:, None], 0.0)
    inv = tl.load(inv_stab_ptr + o, mask=valid, other=0.0).to(f.dtype)
    eq = tl.sum(inv * mean * mean, axis=0) * G
    cols = tl.arange(0, COLS_P)
    if SPECTRUM:
        row = tl.where(cols == 0, eq, 0.0)
        g = tl.arange(0, GP)
        # Row 0 of the basis is the constant function, whose share is the energy above.
        for r in range(1, G):
            br = tl.load(basis_ptr + r * G + g, mask=g < G, other=0.0).to(f.dtype)
            coeff = tl.sum(dev * br[None, :], axis=1)
            part = tl.sum(inv * coeff * coeff, axis=0)
            k = tl.load(row_irrep_ptr + r)
            row += tl.where(cols == k, part, 0.0)
    else:
        pen = tl.sum(inv * tl.sum(dev * dev, axis=1), axis=0)
        row = tl.where(cols == 0, pen, tl.where(cols == 1, eq, 0.0))
    tl.store(part_ptr + pid * N_COLS + cols, row, mask=cols < N_COLS)


@triton.jit
def _finish_kernel(part_ptr, n_rows, out_ptr, out2_ptr, N_COLS: tl.constexpr, COLS_P: tl.constexpr,
                   SPLIT: tl.constexpr, ROWS: tl.constexpr):
    """Adds the partial rows in a fixed order; SPLIT sends columns 0 and 1 to two scalars."""
    r = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS_P)
    acc = tl.zeros([ROWS, COLS_P], dtype=part_ptr.dtype.element_ty)
    for start in range(0, n_rows, ROWS):
        rows = start + r
        m = (rows < n_rows)[:, None] & (cols < N_COLS)[None, :]
        acc += tl.load(part_ptr + rows[:, None] * N_COLS + cols[None, :], mask=m, other=0.0)
    total = tl.sum(acc, axis=0)
    if SPLIT:
        tl.store(out_ptr, tl.sum(tl.where(cols == 0, total, 0.0), axis=0))
        tl.store(out2_ptr, tl.sum(tl.where(cols == 1, total, 0.0), axis=0))
    else:
        tl.store(out_ptr + cols, total, mask=cols < N_COLS)


@triton.jit
def _apply_kernel(w_ptr, out_ptr, offsets_ptr, gp_ptr, ge_ptr,
                  n_orbits, opb, c_in, stride_out, stride_in,
                  G: tl.constexpr, GP: tl.constexpr, PROJECT: tl.constexpr, F64: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    f, o, valid, mask, addr = _load_orbits(w_ptr, offsets_ptr, pid, n_orbits, opb, c_in, stride_out,
                                           stride_in, G, GP, F64, BLOCK)
    mean = tl.sum(f, axis=1) / G
    if PROJECT:
        val = tl.zeros_like(f) + mean[:, None]
    else:
        two_gp = 2 * tl.load(gp_ptr).to(f.dtype)
        two_ge = 2 * tl.load(ge_ptr).to(f.dtype)
        val = two_gp * (f - mean[:, None]) + two_ge * mean[:, None]
    # An entry listed several times in its orbit's row gets the same value each time.
    tl.store(out_ptr + addr, val.to(out_ptr.dtype.element_ty), mask=mask)


# --- launch wrappers --------------------------------------------------------------------------

def _device_ctx(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _geometry(w: torch.Tensor, table):
    G = table.group.order
    return dict(n_orbits=table.n_orbits, opb=table.orbits_per_block, c_in=table.c_in,
                stride_out=table.stride_out, stride_in=table.stride_in,
                G=G, GP=triton.next_power_of_2(G), F64=w.dtype == torch.float64)


# Rows of partial sums the single finishing program adds per step.
_FINISH_ROWS = 512


def reduce_orbits(w: torch.Tensor, table, spectrum: bool):
    """(penalty, eq_energy) as two 0-dim tensors, or the [n_irreps] spectrum, in the accumulation dtype."""
    t = table.device_tables(w.device)._asdict()
    geo = _geometry(w, table)
    acc = torch.float64 if geo["F64"] else torch.float32
    n_cols = len(table.group.irrep_names) if spectrum else 2
    cols_p = triton.next_power_of_2(n_cols)
    n = geo["n_orbits"]
    block, warps = launch_config(geo["G"])
    rows = triton.cdiv(n, block)
    part = torch.empty((rows, n_cols), dtype=acc, device=w.device)

    with _device_ctx(w):
        _reduce_kernel[(rows,)](w, t["offsets"], t["inv_stab"], t["basis"], t["row_irrep"], part,
                                N_COLS=n_cols, COLS_P=cols_p, SPECTRUM=spectrum, BLOCK=block, num_warps=warps,
                                **geo)
        if spectrum:
            out = torch.empty((n_cols,), dtype=acc, device=w.device)
            _finish_kernel[(1,)](part, rows, out, out, N_COLS=n_cols, COLS_P=cols_p,
                                 SPLIT=False, ROWS=_FINISH_ROWS)
            return out
        pen = torch.empty((), dtype=acc, device=w.device)
        eq = torch.empty((), dtype=acc, device=w.device)
        _finish_kernel[(1,)](part, rows, pen, eq, N_COLS=n_cols, COLS_P=cols_p,
                             SPLIT=True, ROWS=_FINISH_ROWS)
    return pen, eq


def apply_orbits(w: torch.Tensor, table, grad_pen=None, grad_eq=None, out_dtype=None):
    """2 grad_pen (W - P W) + 2 grad_eq P W, or P(W) itself when both grads are None.

    The grads are 0-dim tensors on the weight's device, read inside the kernel (no host sync).
    Written in ``out_dtype`` (the weight's dtype for a gradient); in float16 a value above 65504
    in magnitude, e.g. 2 (W - P W) of a weight with a large spread, overflows to inf.
    """
    t = table.device_tables(w.device)._asdict()
    geo = _geometry(w, table)
    project = grad_pen is None
    out = torch.empty(w.shape, dtype=out_dtype or w.dtype, device=w.device)
    if project:
        grad_pen = grad_eq = out  # unread placeholders
    n = geo["n_orbits"]
    block, warps = launch_config(geo["G"])
    with _device_ctx(w):
        _apply_kernel[(triton.cdiv(n, block),)](
            w, out, t["offsets"], grad_pen, grad_eq, PROJECT=project, BLOCK=block, num_warps=warps, **geo)
    return out
