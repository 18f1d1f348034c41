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

Tiled kernels (``reduce_tiles`` / ``apply_tiles``, ``plan_tiles``; the backend takes them when
``PROJKERNELS_TILED=1``, projkernels/backends/triton/finite.py): a program owns a tile of whole
(out-field, in-field) blocks of one out-field row, a contiguous slab of the weight, loads it with
contiguous (vectorisable) loads, resolves its orbits with a gather from the register tile, and the
write pass stores the tile back contiguously.  One row of partial sums per tile, the same second
stage; the plan is a function of the problem alone, so these sums are reproducible too (their bits
differ from the chunked kernels', whose partition differs).  The section "tiles" below explains it.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter.
"""
from __future__ import annotations

import contextlib
import math
import os
import weakref
from typing import NamedTuple, Optional

import numpy as np
import torch
import triton
import triton.language as tl

from ...orbits import acc_dtype

__all__ = ["INTERPRET", "why_unavailable", "launch_config", "reduce_orbits", "apply_orbits", "TilePlan", "plan_tiles", "reduce_tiles",
           "apply_tiles"]

# triton.jit picks the interpreter when it decorates, so the mode is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(device) -> Optional[str]:
    """None when the Triton kernels (every slot of the "triton" backend) can serve ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        if INTERPRET:
            return None
        return ("Triton kernels run on CUDA tensors; CPU tensors are served only under Triton's "
                "interpreter (start the process with TRITON_INTERPRET=1; slow, meant for tests)")
    if device.type == "cuda":
        if INTERPRET:
            return ("TRITON_INTERPRET=1 is set, so the Triton kernels run on the CPU only; "
                    "unset it to run them on the GPU")
        if not torch.cuda.is_available():
            return "CUDA is not available (no GPU, or torch was built without CUDA)"
        return None
    return f"Triton kernels run on CUDA tensors only, not on {device.type!r} tensors"

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
                 G: tl.constexpr, GP: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
                 SIGNED: tl.constexpr):
    """The [BLOCK, GP] tile of orbit values f = s W[entry] in the accumulation dtype, plus indexing
    helpers and the signs s (+1 everywhere unless SIGNED: a table with negative offsets o, which
    read -W[base + ~o], orbits.py and csrc/include/orbit_math.h)."""
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
    if SIGNED:
        neg = off < 0
        off = tl.where(neg, -off - 1, off)
    addr = base[:, None] + off.to(tl.int64)
    f = tl.load(w_ptr + addr, mask=mask, other=0.0)
    if F64:
        f = f.to(tl.float64)
    else:
        f = f.to(tl.float32)
    if SIGNED:
        sign = tl.where(neg, -1.0, 1.0).to(f.dtype)
        f = f * sign
    else:
        sign = 1.0
    return f, o, valid, mask, addr, sign


# Values near the dtype's largest finite value (docs/design.md, "Numerical choices"): the orbit sum
# overflows although the mean does not, and f - mean overflows for such values of opposite signs.
# The usual expressions stay; a tile where one is not finite (one scalar test per tile) computes
# those again on values scaled by 2^-16 (exact; 2^16 >= any group order) and scales them back.
_DOWN = tl.constexpr(1.0 / 65536.0)
_UP = tl.constexpr(65536.0)


@triton.jit
def _not_finite(x):
    return (x - x) != 0


@triton.jit
def _orbit_mean(f, G: tl.constexpr):
    """The mean of each row of the tile ``f`` (zero where masked), finite wherever ``f`` is."""
    s = tl.sum(f, axis=1)
    mean = s / G
    if tl.sum(_not_finite(s).to(tl.int32), axis=0) > 0:
        # Clamped to the row's range: a rounded sum at the largest finite value could pass it.
        scaled = tl.sum(f * _DOWN, axis=1) / G * _UP
        scaled = tl.minimum(tl.maximum(scaled, tl.min(f, axis=1)), tl.max(f, axis=1))
        mean = tl.where(_not_finite(s), scaled, mean)
    return mean


@triton.jit
def _any_not_finite(x):
    return tl.sum(tl.sum(_not_finite(x).to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _orbit_partials(f, inv, mask, basis_ptr, row_irrep_ptr,
                    G: tl.constexpr, GP: tl.constexpr, COLS_P: tl.constexpr, SPECTRUM: tl.constexpr):
    """One program's row of partial sums from its [orbits, GP] tile ``f`` (zero where ``mask`` is
    off) and the orbits' 1/|Stab| ``inv``: (penalty, eq_energy), or the energies per irrep."""
    mean = _orbit_mean(f, G)
    dev = tl.where(mask, f - mean[:, None], 0.0)
    eq = tl.sum(inv * mean * mean, axis=0) * G
    cols = tl.arange(0, COLS_P)
    if SPECTRUM:
        row = tl.where(cols == 0, eq, 0.0)
        g = tl.arange(0, GP)
        # Row 0 of the basis is the constant function, whose share is the energy above.
        for r in range(1, G):
            br = tl.load(basis_ptr + r * G + g, mask=g < G, other=0.0).to(f.dtype)
            coeff = tl.sum(dev * br[None, :], axis=1)
            e = inv * coeff * coeff
            if tl.sum(_not_finite(coeff).to(tl.int32), axis=0) > 0:
                # A deviation that overflowed makes the coefficient inf - inf: on scaled values.
                dev_s = tl.where(mask, f * _DOWN - (mean * _DOWN)[:, None], 0.0)
                c_s = tl.sum(dev_s * br[None, :], axis=1)
                e = tl.where(_not_finite(coeff), inv * c_s * c_s * _UP * _UP, e)
            part = tl.sum(e, axis=0)
            k = tl.load(row_irrep_ptr + r)
            row += tl.where(cols == k, part, 0.0)
    else:
        ss = tl.sum(dev * dev, axis=1)
        e = inv * ss
        if tl.sum(_not_finite(ss).to(tl.int32), axis=0) > 0:
            # A repeated entry counts |Stab| times in ss, so inv * ss can be finite where ss is not.
            dev_s = tl.where(mask, f * _DOWN - (mean * _DOWN)[:, None], 0.0)
            e = tl.where(_not_finite(ss), inv * tl.sum(dev_s * dev_s, axis=1) * _UP * _UP, e)
        pen = tl.sum(e, axis=0)
        row = tl.where(cols == 0, pen, tl.where(cols == 1, eq, 0.0))
    return row


@triton.jit
def _reduce_kernel(w_ptr, offsets_ptr, inv_stab_ptr, basis_ptr, row_irrep_ptr, part_ptr,
                   n_orbits, opb, c_in, stride_out, stride_in,
                   G: tl.constexpr, GP: tl.constexpr, N_COLS: tl.constexpr, COLS_P: tl.constexpr,
                   SPECTRUM: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr, SIGNED: tl.constexpr):
    pid = tl.program_id(0)
    f, o, valid, mask, addr, sign = _load_orbits(w_ptr, offsets_ptr, pid, n_orbits, opb, c_in, stride_out,
                                                 stride_in, G, GP, F64, BLOCK, SIGNED)
    inv = tl.load(inv_stab_ptr + o, mask=valid, other=0.0).to(f.dtype)
    row = _orbit_partials(f, inv, mask, basis_ptr, row_irrep_ptr, G, GP, COLS_P, SPECTRUM)
    cols = tl.arange(0, COLS_P)
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
                  BLOCK: tl.constexpr, SIGNED: tl.constexpr):
    pid = tl.program_id(0)
    f, o, valid, mask, addr, sign = _load_orbits(w_ptr, offsets_ptr, pid, n_orbits, opb, c_in, stride_out,
                                                 stride_in, G, GP, F64, BLOCK, SIGNED)
    mean = _orbit_mean(f, G)
    if PROJECT:
        val = tl.zeros_like(f) + mean[:, None]
    else:
        two_gp = 2 * tl.load(gp_ptr).to(f.dtype)
        two_ge = 2 * tl.load(ge_ptr).to(f.dtype)
        val = two_gp * (f - mean[:, None]) + two_ge * mean[:, None]
        if _any_not_finite(val):
            m_s = (mean * _DOWN)[:, None]
            val = tl.where(_not_finite(val), (two_gp * (f * _DOWN - m_s) + two_ge * m_s) * _UP, val)
    if SIGNED:
        val = val * sign  # back from f's terms: the value at entry g . e is s(g, e) times it
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
                G=G, GP=triton.next_power_of_2(G), F64=w.dtype == torch.float64, SIGNED=table.signed)


# Rows of partial sums the single finishing program adds per step.
_FINISH_ROWS = 512


def reduce_orbits(w: torch.Tensor, table, spectrum: bool):
    """(penalty, eq_energy) as two 0-dim tensors, or the [n_irreps] spectrum, in the accumulation dtype."""
    t = table.device_tables(w.device, spectrum=spectrum)._asdict()
    geo = _geometry(w, table)
    n_cols, cols_p = _columns(table, spectrum)
    block, warps = launch_config(geo["G"])
    rows = triton.cdiv(geo["n_orbits"], block)
    part = torch.empty((rows, n_cols), dtype=acc_dtype(w.dtype), device=w.device)
    with _device_ctx(w):
        _reduce_kernel[(rows,)](w, t["offsets"], t["inv_stab"], t["basis"], t["row_irrep"], part,
                                N_COLS=n_cols, COLS_P=cols_p, SPECTRUM=spectrum, BLOCK=block, num_warps=warps,
                                **geo)
        return _finish(part, spectrum)


def _columns(table, spectrum: bool):
    """(columns of a partial-sums row, that rounded up to a power of two)."""
    n_cols = len(table.group.irrep_names) if spectrum else 2
    return n_cols, triton.next_power_of_2(n_cols)


def _finish(part: torch.Tensor, spectrum: bool):
    """The second stage: adds the rows of ``part`` in a fixed order (inside the device context)."""
    rows, n_cols = part.shape
    cols_p = triton.next_power_of_2(n_cols)
    if spectrum:
        out = torch.empty((n_cols,), dtype=part.dtype, device=part.device)
        _finish_kernel[(1,)](part, rows, out, out, N_COLS=n_cols, COLS_P=cols_p,
                             SPLIT=False, ROWS=_FINISH_ROWS)
        return out
    pen = torch.empty((), dtype=part.dtype, device=part.device)
    eq = torch.empty((), dtype=part.dtype, device=part.device)
    _finish_kernel[(1,)](part, rows, pen, eq, N_COLS=n_cols, COLS_P=cols_p,
                         SPLIT=True, ROWS=_FINISH_ROWS)
    return pen, eq


def apply_orbits(w: torch.Tensor, table, grad_pen=None, grad_eq=None, out_dtype=None):
    """2 grad_pen (W - P W) + 2 grad_eq P W, or P(W) itself when both grads are None.

    The grads are 0-dim tensors on the weight's device, read inside the kernel (no host sync).
    Written in ``out_dtype`` (the weight's dtype for a gradient); in float16 a value above 65504
    in magnitude, e.g. 2 (W - P W) of a weight with a large spread, overflows to inf.
    """
    t = table.device_tables(w.device, spectrum=False)._asdict()
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


# --- tiles: contiguous runs of whole (out-field, in-field) blocks -------------------------------
#
# In a contiguous weight the blocks fi0 .. fi0 + width - 1 of out-field row fo are ``so`` segments
# of ``pitch = width * stride_in`` contiguous entries, segment a at fo * stride_out + a * row_len +
# fi0 * stride_in (row_len = c_in * stride_in, so = the out-field size), the geometry of the CUDA
# tiles (csrc/include/launch_plan.h).  A tiled program loads its tile as one [SO_P * PITCH_P] register tensor,
# segment a at a * PITCH_P (SO_P, PITCH_P: so and the widest pitch rounded up to powers of two), with
# contiguous loads, then resolves the orbits inside the tile.
#
# The orbits are resolved with tl.gather from the register tile (Triton >= 3.2; the same rules, a
# 1-D source and a 1-D index of any length, in 3.6 and 3.8, and in the interpreter).  Re-loading the
# orbit entries from global memory after a contiguous load, hoping they hit L1, is not something a
# Triton program can express: the forward never uses the contiguous values, so the compiler drops
# that load, and nothing keeps the slab in L1 between the two.  The gather keeps the tile on chip by
# construction: the compiler stages it through shared memory (or shuffles within a warp) as the CUDA
# tiled kernels do by hand.  The backward gathers the other way too: every entry of a block lies on
# exactly one orbit, so each tile entry takes its orbit's mean from the [orbits] vector of means and
# the tile is written back with contiguous stores, never a scattered one.
#
# The plan, like the chunked launch configuration, is a function of the problem alone (shape, reps,
# group, element size), so the partition of every sum is too.

# The register tile holds at most this many entries (padding included), and the [orbits, GP] tile
# gathered from it at most _GATHER_ENTRIES values (larger than the tile: orbits with stabilisers
# list entries several times); at 4 warps, 16 and 32 values a thread.
_TILE_ENTRIES = 2048
_GATHER_ENTRIES = 4096
# Small weights get narrower tiles, down to one block a tile, until there are this many programs.
_MIN_TILES = 1024


class TilePlan(NamedTuple):
    so: int               # out-field size: segments per tile
    stride_in: int        # entries of one segment of one block
    row_len: int          # c_in * stride_in
    blocks_per_tile: int  # the width of every tile but the last of a row
    tiles_per_row: int
    n_tiles: int
    so_p: int             # so, rounded up to a power of two
    pitch_p: int          # blocks_per_tile * stride_in, rounded up to a power of two
    orbits_p: int         # blocks_per_tile * orbits_per_block, rounded up to a power of two
    vec: int              # entries every segment start is a multiple of (16 bytes at most)


def plan_tiles(table, elem_bytes: int) -> Optional[TilePlan]:
    """How the tiled kernels cut a contiguous weight of ``table``'s shape, or None when one block
    does not fit a program's tile (the chunked kernels then serve it).  A function of the problem."""
    so, stride_in, c_in, c_out = table.field_out, table.stride_in, table.c_in, table.c_out
    opb, gp = table.orbits_per_block, triton.next_power_of_2(table.group.order)
    so_p = triton.next_power_of_2(so)
    width = min(c_in, (_TILE_ENTRIES // so_p) // stride_in, (_GATHER_ENTRIES // gp) // opb)
    if width < 1:
        return None
    while width > 1 and c_out * triton.cdiv(c_in, width) < _MIN_TILES:
        width = (width + 1) // 2
    # Segment starts that are multiples of `vec` entries (16 bytes where the shape allows) let the
    # compiler prove aligned contiguous runs and issue vector loads and stores.  A width that is a
    # multiple of `q` blocks keeps every tile start, the narrower last tile's included, aligned.
    row_len = c_in * stride_in
    vec = max(1, 16 // elem_bytes)
    while vec > 1 and row_len % vec:
        vec //= 2
    q = vec // math.gcd(vec, stride_in)
    if width >= q:
        width -= width % q
    while vec > 1 and (width * stride_in) % vec:
        vec //= 2
    tiles_per_row = triton.cdiv(c_in, width)
    return TilePlan(so=so, stride_in=stride_in, row_len=row_len, blocks_per_tile=width,
                    tiles_per_row=tiles_per_row, n_tiles=c_out * tiles_per_row, so_p=so_p,
                    pitch_p=triton.next_power_of_2(width * stride_in),
                    orbits_p=triton.next_power_of_2(width * opb), vec=vec)


class TileTables(NamedTuple):
    """Where things sit in a tile, the same for every tile of a plan (a narrower last tile masks the
    blocks it lacks), so the kernels read them with contiguous loads and do no index arithmetic."""
    gather_index: torch.Tensor  # [ORB_P * GP] int32: the tile lane of element g of local orbit l, at l * GP + g
    lane_orbit: torch.Tensor    # [SO_P * PITCH_P] int32: the local orbit of each tile lane
    # Signed tables only (else 1-element stand-ins): s(g, e) of each gathered element, and the sign
    # of each lane against its orbit's mean (P(W) there = sign * mean), as float32 +1 / -1.
    gather_sign: torch.Tensor   # [ORB_P * GP]
    lane_sign: torch.Tensor     # [SO_P * PITCH_P]


# Per orbit table, per (device, plan): built once, dropped with the table.
_TILE_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tile_tables(table, plan: TilePlan, device) -> TileTables:
    """The orbit table in the coordinates of ``plan``'s tiles, on ``device`` (cached).

    Local orbit l = j * opb + o is orbit o of the tile's block j; its block-local offset a * row_len +
    rest is tile lane a * PITCH_P + j * stride_in + rest.  Padding lanes and orbits get index 0 (a
    valid lane; the kernels mask what they read there).
    """
    key = (str(torch.device(device)), plan)
    cache = _TILE_TABLES.setdefault(table, {})
    if key not in cache:
        offsets = table.entry_offsets.numpy()
        signs = table.offset_signs.numpy() if table.signed else np.ones(offsets.shape, dtype=np.int64)
        opb, G = offsets.shape
        gp = triton.next_power_of_2(G)
        a, rest = np.divmod(offsets, plan.row_len)
        if a.max() >= plan.so or rest.max() >= plan.stride_in:
            raise AssertionError(f"orbit table of shape {table.shape}: an offset leaves its block")
        width, si = plan.blocks_per_tile, plan.stride_in
        lane = a * plan.pitch_p + rest                                     # [opb, G], block 0
        gather_index = np.zeros((plan.orbits_p, gp), dtype=np.int64)
        gather_index[:width * opb, :G] = (np.arange(width)[:, None, None] * si + lane[None]).reshape(-1, G)
        block_orbit = np.full((plan.so, si), -1, dtype=np.int64)          # orbit of block entry (a, rest)
        block_orbit[a.reshape(-1), rest.reshape(-1)] = np.repeat(np.arange(opb), G)
        # An entry listed with both signs has mean 0, so whichever sign lands here serves.
        block_sign = np.ones((plan.so, si), dtype=np.int64)
        block_sign[a.reshape(-1), rest.reshape(-1)] = signs.reshape(-1)
        if block_orbit.min() < 0:
            raise AssertionError(f"orbit table of shape {table.shape}: an entry of a block lies on no orbit")
        lane_orbit = np.zeros((plan.so_p, plan.pitch_p), dtype=np.int64)
        lane_orbit[:plan.so, :width * si] = (np.arange(width)[None, :, None] * opb
                                             + block_orbit[:, None, :]).reshape(plan.so, width * si)
        if table.signed:
            gather_sign = np.ones((plan.orbits_p, gp), dtype=np.float32)
            gather_sign[:width * opb, :G] = np.broadcast_to(signs[None], (width, opb, G)).reshape(-1, G)
            lane_sign = np.ones((plan.so_p, plan.pitch_p), dtype=np.float32)
            lane_sign[:plan.so, :width * si] = np.broadcast_to(block_sign[:, None, :], (plan.so, width, si)).reshape(
                plan.so, width * si)
        else:
            gather_sign = lane_sign = np.ones(1, dtype=np.float32)
        cache[key] = TileTables(
            gather_index=torch.as_tensor(gather_index.reshape(-1), dtype=torch.int32).to(device),
            lane_orbit=torch.as_tensor(lane_orbit.reshape(-1), dtype=torch.int32).to(device),
            gather_sign=torch.as_tensor(gather_sign.reshape(-1)).to(device),
            lane_sign=torch.as_tensor(lane_sign.reshape(-1)).to(device))
    return cache[key]


@triton.jit
def _load_tile(w_ptr, t, tiles_per_row, c_in, stride_in, so, stride_out_v, row_len_v, tile_step_v,
               SO_P: tl.constexpr, PITCH_P: tl.constexpr, VEC: tl.constexpr, BPT: tl.constexpr):
    """Tile t as a [SO_P * PITCH_P] tensor in the weight's dtype, with its addresses, mask and width.

    Addresses are formed in units of VEC entries and scaled by the constexpr VEC, and the mask
    compares against a multiple of VEC, so the compiler sees runs of PITCH_P contiguous entries that
    start on multiples of VEC under a mask constant over each VEC-group: 16-byte loads and stores
    (checked in the PTX for sm_90).
    """
    fo = t // tiles_per_row
    k = t - fo * tiles_per_row
    width = tl.minimum(c_in - k * BPT, BPT)
    pitch_v = width * stride_in // VEC  # exact: the plan keeps every pitch a multiple of VEC
    p = tl.arange(0, SO_P * PITCH_P)
    a = p // PITCH_P
    c = p % PITCH_P
    # 64-bit addresses: a large weight can pass 2**31 entries; a tile cannot.
    base_v = fo.to(tl.int64) * stride_out_v + k.to(tl.int64) * tile_step_v
    addr = (base_v + a.to(tl.int64) * row_len_v) * VEC + c
    inside = (a < so) & (c < pitch_v * VEC)
    x = tl.load(w_ptr + addr, mask=inside, other=0.0)
    return x, addr, inside, p, width


@triton.jit
def _tile_orbits(x, width, gather_index_ptr, gather_sign_ptr, opb,
                 G: tl.constexpr, GP: tl.constexpr, F64: tl.constexpr, ORB_P: tl.constexpr, SIGNED: tl.constexpr):
    """The tile's orbits gathered from the register tile x: [ORB_P, GP] values f = s W in the
    accumulation dtype (zero where masked), their block-local orbit ids, validity and mask."""
    idx = tl.load(gather_index_ptr + tl.arange(0, ORB_P * GP))
    f = tl.reshape(tl.gather(x, idx, 0), [ORB_P, GP])
    if F64:
        f = f.to(tl.float64)
    else:
        f = f.to(tl.float32)
    if SIGNED:
        f = f * tl.reshape(tl.load(gather_sign_ptr + tl.arange(0, ORB_P * GP)), [ORB_P, GP]).to(f.dtype)
    l = tl.arange(0, ORB_P)
    valid = l < width * opb
    mask = valid[:, None] & (tl.arange(0, GP) < G)[None, :]
    f = tl.where(mask, f, 0.0)
    return f, l % opb, valid, mask


@triton.jit
def _reduce_tiles_kernel(w_ptr, gather_index_ptr, gather_sign_ptr, inv_stab_ptr, basis_ptr, row_irrep_ptr, part_ptr,
                         tiles_per_row, c_in, stride_in, so, opb, stride_out_v, row_len_v, tile_step_v,
                         G: tl.constexpr, GP: tl.constexpr, N_COLS: tl.constexpr, COLS_P: tl.constexpr,
                         SPECTRUM: tl.constexpr, F64: tl.constexpr, SO_P: tl.constexpr, PITCH_P: tl.constexpr,
                         ORB_P: tl.constexpr, VEC: tl.constexpr, BPT: tl.constexpr, SIGNED: tl.constexpr):
    t = tl.program_id(0)
    x, addr, inside, p, width = _load_tile(w_ptr, t, tiles_per_row, c_in, stride_in, so, stride_out_v,
                                           row_len_v, tile_step_v, SO_P, PITCH_P, VEC, BPT)
    f, o, valid, mask = _tile_orbits(x, width, gather_index_ptr, gather_sign_ptr, opb, G, GP, F64, ORB_P, SIGNED)
    inv = tl.load(inv_stab_ptr + o, mask=valid, other=0.0).to(f.dtype)
    row = _orbit_partials(f, inv, mask, basis_ptr, row_irrep_ptr, G, GP, COLS_P, SPECTRUM)
    cols = tl.arange(0, COLS_P)
    tl.store(part_ptr + t * N_COLS + cols, row, mask=cols < N_COLS)


@triton.jit
def _apply_tiles_kernel(w_ptr, out_ptr, gather_index_ptr, gather_sign_ptr, lane_orbit_ptr, lane_sign_ptr, gp_ptr,
                        ge_ptr, tiles_per_row, c_in, stride_in, so, opb, stride_out_v, row_len_v, tile_step_v,
                        G: tl.constexpr, GP: tl.constexpr, PROJECT: tl.constexpr, F64: tl.constexpr,
                        SO_P: tl.constexpr, PITCH_P: tl.constexpr, ORB_P: tl.constexpr, VEC: tl.constexpr,
                        BPT: tl.constexpr, SIGNED: tl.constexpr):
    t = tl.program_id(0)
    x, addr, inside, p, width = _load_tile(w_ptr, t, tiles_per_row, c_in, stride_in, so, stride_out_v,
                                           row_len_v, tile_step_v, SO_P, PITCH_P, VEC, BPT)
    f, o, valid, mask = _tile_orbits(x, width, gather_index_ptr, gather_sign_ptr, opb, G, GP, F64, ORB_P, SIGNED)
    mean = _orbit_mean(f, G)
    # Every entry of a block lies on exactly one orbit: each lane takes its orbit's mean (P(W) there,
    # times the lane's sign for a signed table).
    m = tl.gather(mean, tl.load(lane_orbit_ptr + p), 0)
    if SIGNED:
        m = m * tl.load(lane_sign_ptr + p).to(m.dtype)
    if PROJECT:
        val = m
    else:
        two_gp = 2 * tl.load(gp_ptr).to(f.dtype)
        two_ge = 2 * tl.load(ge_ptr).to(f.dtype)
        xf = x.to(f.dtype)
        val = two_gp * (xf - m) + two_ge * m
        if tl.sum(_not_finite(val).to(tl.int32)) > 0:
            m_s = m * _DOWN
            val = tl.where(_not_finite(val), (two_gp * (xf * _DOWN - m_s) + two_ge * m_s) * _UP, val)
    tl.store(out_ptr + addr, val.to(out_ptr.dtype.element_ty), mask=inside)


def _tile_args(w: torch.Tensor, table, plan: TilePlan):
    G = table.group.order
    v = plan.vec
    return dict(tiles_per_row=plan.tiles_per_row, c_in=table.c_in, stride_in=plan.stride_in, so=plan.so,
                opb=table.orbits_per_block, stride_out_v=table.stride_out // v, row_len_v=plan.row_len // v,
                tile_step_v=plan.blocks_per_tile * plan.stride_in // v,
                G=G, GP=triton.next_power_of_2(G), F64=w.dtype == torch.float64, SO_P=plan.so_p,
                PITCH_P=plan.pitch_p, ORB_P=plan.orbits_p, VEC=v, BPT=plan.blocks_per_tile, SIGNED=table.signed,
                num_warps=_NUM_WARPS)


def reduce_tiles(w: torch.Tensor, table, plan: TilePlan, spectrum: bool):
    """``reduce_orbits`` by tiles (``plan = plan_tiles(table, w.element_size())``; w contiguous):
    one row of partial sums per tile, added in a fixed order."""
    t = table.device_tables(w.device, spectrum=spectrum)._asdict()
    tt = tile_tables(table, plan, w.device)
    n_cols, cols_p = _columns(table, spectrum)
    part = torch.empty((plan.n_tiles, n_cols), dtype=acc_dtype(w.dtype), device=w.device)
    with _device_ctx(w):
        _reduce_tiles_kernel[(plan.n_tiles,)](w, tt.gather_index, tt.gather_sign, t["inv_stab"], t["basis"], t["row_irrep"], part,
                                              N_COLS=n_cols, COLS_P=cols_p, SPECTRUM=spectrum,
                                              **_tile_args(w, table, plan))
        return _finish(part, spectrum)


def apply_tiles(w: torch.Tensor, table, plan: TilePlan, grad_pen=None, grad_eq=None, out_dtype=None):
    """``apply_orbits`` by tiles (``plan = plan_tiles(table, w.element_size())``; w contiguous):
    every tile is read and written with contiguous accesses."""
    tt = tile_tables(table, plan, w.device)
    project = grad_pen is None
    out = torch.empty(w.shape, dtype=out_dtype or w.dtype, device=w.device)
    if project:
        grad_pen = grad_eq = out  # unread placeholders
    with _device_ctx(w):
        _apply_tiles_kernel[(plan.n_tiles,)](w, out, tt.gather_index, tt.gather_sign, tt.lane_orbit, tt.lane_sign,
                                             grad_pen, grad_eq,
                                             PROJECT=project, **_tile_args(w, table, plan))
    return out
