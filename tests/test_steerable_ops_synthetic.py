"""The compiled steerable ops on synthetic layouts, without escnn.

A layout is made of block types with random orthonormal Q_t (rank 0 included, fields of several
sizes, unevenly placed, some channels in no block of a type) and goes through the same builder as a
real symmetry's (``steerable._native_layout``).  The oracle is the dense projection assembled from
the same Q_t block by block, in float64.  The CPU tests run everywhere; the GPU tests (marked gpu)
hold the CUDA kernels against the oracle and against the CPU kernels, and need no escnn, so they run
on any machine with a GPU and the extension built with CUDA.
"""
from types import SimpleNamespace

import pytest
import torch

from projkernels.steerable import BlockType, _native_layout

C = pytest.importorskip("projkernels.native", reason="projkernels._C is not built")
if not hasattr(torch.ops.projkernels_C, "steerable_penalty_energy"):
    pytest.skip("projkernels._C was built without the steerable ops", allow_module_level=True)
OPS = torch.ops.projkernels_C


def _orthonormal(m: int, r: int, g: torch.Generator) -> torch.Tensor:
    if r == 0:
        return torch.zeros(m, 0, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))
    return q


def synthetic(c_out_fields, c_in_fields, spatial, ranks, seed=0):
    """A symmetry stand-in: output fields of sizes ``c_out_fields`` and input fields of sizes
    ``c_in_fields``, one block type per (output size, input size) pair, of rank ranks[(d_out, d_in)]."""
    g = torch.Generator().manual_seed(seed)
    s = 1
    for k in spatial:
        s *= k
    out_off, in_off = [0], [0]
    for d in c_out_fields:
        out_off.append(out_off[-1] + d)
    for d in c_in_fields:
        in_off.append(in_off[-1] + d)
    types = []
    for d_out in sorted(set(c_out_fields)):
        for d_in in sorted(set(c_in_fields)):
            outs = tuple(out_off[i] for i, d in enumerate(c_out_fields) if d == d_out)
            ins = tuple(in_off[i] for i, d in enumerate(c_in_fields) if d == d_in)
            m = d_out * d_in * s
            r = min(ranks.get((d_out, d_in), 1), m)
            types.append(BlockType(f"o{d_out}", f"i{d_in}", d_out, d_in, outs, ins, _orthonormal(m, r, g)))
    shape = (out_off[-1], in_off[-1]) + tuple(spatial)
    return SimpleNamespace(types=types, weight_shape=shape, numel=shape[0] * shape[1] * s)


def dense_projection(sym) -> torch.Tensor:
    """[numel, numel] float64: the block-diagonal projector, each block's Q_t Q_t^T placed at its
    (output field, input field) entries."""
    c_out, c_in = sym.weight_shape[:2]
    s = sym.numel // (c_out * c_in)
    P = torch.zeros(sym.numel, sym.numel, dtype=torch.float64)
    idx = torch.arange(sym.numel).reshape(c_out, c_in, s)
    for t in sym.types:
        for o in t.out_fields:
            for i in t.in_fields:
                e = idx[o:o + t.d_out, i:i + t.d_in].reshape(-1)
                P[e[:, None], e[None, :]] = t.q @ t.q.T
    return P


CASES = {
    # mixed field sizes, a rank-0 type, a 3x3 kernel
    "mixed": (([1, 2, 2, 3, 1], [2, 1, 3], (3, 3)), {(1, 1): 3, (1, 2): 0, (2, 1): 2, (2, 2): 5, (3, 3): 9, (3, 2): 4}),
    # a Linear weight of 2-D fields
    "linear": (([2] * 7, [2] * 5, ()), {(2, 2): 2}),
    # many blocks of one type: several tiles on every device, rows left over after register groups
    "many": (([1] * 37, [1] * 11, (5, 5)), {(1, 1): 7}),
    # a large block (m = 5 * 5 * 125 = 3125, r = 40): Q_t (1 MB in float64) far above shared memory
    "big_q": (([5, 5], [5], (5, 5, 5)), {(5, 5): 40}),
}


def _run(sym, w):
    lay = _native_layout(sym, w.device, torch.float64 if w.dtype == torch.float64 else torch.float32)
    pen, eq = OPS.steerable_penalty_energy(w, lay.table, lay.geometry)
    pw = OPS.steerable_project(w, lay.table, lay.geometry)
    gp = torch.tensor(0.7, dtype=pen.dtype, device=w.device)
    ge = torch.tensor(-0.3, dtype=pen.dtype, device=w.device)
    dw = OPS.steerable_penalty_energy_backward(w, gp, ge, lay.table, lay.geometry)
    return pen, eq, pw, dw


def _expected(sym, w):
    P = dense_projection(sym)
    x = w.detach().double().cpu().reshape(-1)
    px = P @ x
    pen = (x - px).square().sum()
    eq = px.square().sum()
    dw = 2 * 0.7 * (x - px) + 2 * -0.3 * px
    return pen, eq, px.reshape(w.shape), dw.reshape(w.shape)


def _check(sym, w, tol):
    pen, eq, pw, dw = _run(sym, w)
    e_pen, e_eq, e_pw, e_dw = _expected(sym, w)
    scale = float(w.double().square().sum())
    assert abs(float(pen) - float(e_pen)) <= tol * scale, (float(pen), float(e_pen))
    assert abs(float(eq) - float(e_eq)) <= tol * scale, (float(eq), float(e_eq))
    amax = float(w.double().abs().max())
    torch.testing.assert_close(pw.double().cpu(), e_pw, rtol=0, atol=tol * 10 * amax)
    torch.testing.assert_close(dw.double().cpu(), e_dw, rtol=0, atol=tol * 10 * amax)
    assert pw.dtype == w.dtype and dw.dtype == w.dtype and pw.shape == w.shape


TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_ops_match_the_dense_projection(name, dtype):
    args, ranks = CASES[name]
    sym = synthetic(*args, ranks)
    w = torch.randn(sym.weight_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    _check(sym, w, TOL[dtype])


def test_the_oracle_is_a_projector_and_the_layout_covers_every_block():
    # Guards the test itself: P idempotent and symmetric; a weight built in P's range has no penalty.
    sym = synthetic(*CASES["mixed"][0], CASES["mixed"][1])
    P = dense_projection(sym)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-12)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-15)
    w = (P @ torch.randn(sym.numel, dtype=torch.float64)).reshape(sym.weight_shape)
    pen, eq, pw, _ = _run(sym, w)
    assert float(pen) <= 1e-26 * float(eq)
    torch.testing.assert_close(pw, w, rtol=0, atol=1e-14)


def _cuda_ready():
    return torch.cuda.is_available() and C.WITH_CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_ops_match_the_dense_projection_and_the_cpu(name, dtype):
    if not _cuda_ready():
        pytest.skip("needs a CUDA device and the extension built with CUDA")
    args, ranks = CASES[name]
    sym = synthetic(*args, ranks)
    w = torch.randn(sym.weight_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    _check(sym, w.cuda(), TOL[dtype])
    # And against the CPU kernels, element by element (different reduction trees: close, not equal).
    for got, ref in zip(_run(sym, w.cuda()), _run(sym, w)):
        torch.testing.assert_close(got.double().cpu(), ref.double(), rtol=TOL[dtype], atol=TOL[dtype] * 10)
    # Reproducible bit for bit from call to call.
    a, b = _run(sym, w.cuda()), _run(sym, w.cuda())
    for x, y in zip(a, b):
        assert torch.equal(x, y)
