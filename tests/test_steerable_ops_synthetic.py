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

from projkernels.symmetry.steerable import BlockType, _native_layout

C = pytest.importorskip("projkernels.backends.native", reason="projkernels._C is not built")
if not hasattr(torch.ops.projkernels_C, "steerable_penalty_energy"):
    pytest.skip("projkernels._C was built without the steerable ops", allow_module_level=True)
OPS = torch.ops.projkernels_C


def _orthonormal(m: int, r: int, g: torch.Generator) -> torch.Tensor:
    if r == 0:
        return torch.zeros(m, 0, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))
    return q


def householder(m: int, r: int, seed: int, device="cpu") -> torch.Tensor:
    """[m, r] float64 with orthonormal columns, dense: the first r columns of the reflection
    I - 2 v v^T / v^T v.  No QR, so ranks in the thousands cost O(m r) (on the GPU for those)."""
    v = torch.randn(m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
    q = torch.outer(v, v[:r]) * (-2.0 / float(v.dot(v)))
    q.diagonal().add_(1.0)
    return q


def synthetic(c_out_fields, c_in_fields, spatial, ranks, seed=0, make_q=None):
    """A symmetry stand-in: output fields of sizes ``c_out_fields`` and input fields of sizes
    ``c_in_fields``, one block type per (output size, input size) pair, of rank ranks[(d_out, d_in)].
    Q_t from QR of a random matrix, or ``make_q(m, r, seed)`` where given."""
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
            q = _orthonormal(m, r, g) if make_q is None else make_q(m, r, seed + len(types))
            types.append(BlockType(f"o{d_out}", f"i{d_in}", d_out, d_in, outs, ins, q))
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


def _run(sym, w, ops=OPS, lay=None):
    """(penalty, energy, P W, dW) through ``ops`` (the extension's, or an emulated library's) on
    ``lay``, by default the layout of w's device."""
    if lay is None:
        lay = _native_layout(sym, w.device, torch.float64 if w.dtype == torch.float64 else torch.float32)
    pen, eq = ops.steerable_penalty_energy(w, lay.table, lay.geometry)
    pw = ops.steerable_project(w, lay.table, lay.geometry)
    gp = torch.tensor(0.7, dtype=pen.dtype, device=w.device)
    ge = torch.tensor(-0.3, dtype=pen.dtype, device=w.device)
    dw = ops.steerable_penalty_energy_backward(w, gp, ge, lay.table, lay.geometry)
    return pen, eq, pw, dw


def _expected(sym, w):
    P = dense_projection(sym)
    x = w.detach().double().cpu().reshape(-1)
    px = P @ x
    pen = (x - px).square().sum()
    eq = px.square().sum()
    dw = 2 * 0.7 * (x - px) + 2 * -0.3 * px
    return pen, eq, px.reshape(w.shape), dw.reshape(w.shape)


def _blockwise_expected(sym, w):
    """The same results block by block, P x_b = Q_t (Q_t^T x_b) in float64 from each type's Q_t and
    fields (not the layout's table), on w's device: for layouts too large for the dense projector."""
    c_out, c_in = sym.weight_shape[:2]
    x = w.detach().double().reshape(c_out, c_in, -1)
    px = torch.zeros_like(x)
    for t in sym.types:
        q = t.q.to(device=x.device, dtype=torch.float64)
        for o in t.out_fields:
            for i in t.in_fields:
                xb = x[o:o + t.d_out, i:i + t.d_in].reshape(-1)
                px[o:o + t.d_out, i:i + t.d_in] = (q @ (q.T @ xb)).reshape(t.d_out, t.d_in, -1)
    pen = (x - px).square().sum()
    eq = px.square().sum()
    dw = 2 * 0.7 * (x - px) + 2 * -0.3 * px
    return pen.cpu(), eq.cpu(), px.reshape(w.shape).cpu(), dw.reshape(w.shape).cpu()


def _check(sym, w, tol, expected=_expected, ops=OPS, lay=None):
    pen, eq, pw, dw = _run(sym, w, ops, lay)
    e_pen, e_eq, e_pw, e_dw = expected(sym, w)
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


# --- the CUDA kernels' shared-memory fallbacks ------------------------------------------------------
#
# A CUDA block puts its tile's coefficients, then Q_t^T, then the tile's blocks in shared memory where
# each fits next to the ones before (steer_staging in csrc/include/steerable_math.h), within a budget of B
# numbers of the accumulation dtype, and reads the rest from global memory; coefficients beyond B go
# to a global scratch buffer.  These layouts are sized from B so that each fallback is taken.

_STATIC_SHARED_RESERVE = 1024  # bytes the kernels leave for static shared memory (csrc/cuda/cuda_launch.cuh)
FALLBACKS = ["coefficients", "blocks_q_shared", "blocks_global"]


def fallback_layout(kind, budget, make_q):
    """A synthetic layout on which the CUDA kernels take one fallback at a budget of ``budget`` numbers:
      "coefficients": three types of two one-block tiles each: the first of rank 5 (coefficients in
                      shared memory), the next two of rank budget + 1 (every tile's coefficients in
                      the global scratch, the third type's after the second's; a tile's place in
                      the scratch is then not its global tile number);
      "blocks_q_shared": 60 blocks of m = 128 in tiles of 16 (the GPU layout's tiles of ~2048
                      elements), the rank such that C and Q_t^T fit and the tile's blocks do not next
                      to them, so X is gathered from W on each use;
      "blocks_global": two blocks of m = budget + 40, rank 5: neither Q_t^T nor X fits."""
    if kind == "coefficients":
        r = budget + 1
        return synthetic([1, 1], [1, 2, 3], (budget + 8,), {(1, 1): 5, (1, 2): r, (1, 3): r}, make_q=make_q)
    if kind == "blocks_q_shared":
        m, per_tile = 128, 2048 // 128
        r = min(m, budget // (per_tile + m))
        assert 1 <= r and per_tile * r + m * r <= budget < per_tile * r + m * r + per_tile * m
        return synthetic([1] * 3, [1] * 20, (m,), {(1, 1): r}, make_q=make_q)
    if kind == "blocks_global":
        return synthetic([1, 1], [1], (budget + 40,), {(1, 1): 5}, make_q=make_q)
    raise ValueError(kind)


def test_the_blockwise_oracle_matches_the_dense_one_and_householder_is_orthonormal():
    # Guards the helpers of the fallback tests.
    q = householder(50, 30, seed=3)
    torch.testing.assert_close(q.T @ q, torch.eye(30, dtype=torch.float64), rtol=0, atol=1e-14)
    assert bool((q != 0).all())
    sym = synthetic(*CASES["mixed"][0], CASES["mixed"][1])
    w = torch.randn(sym.weight_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for got, ref in zip(_blockwise_expected(sym, w), _expected(sym, w)):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", FALLBACKS)
def test_cpu_ops_on_the_gpu_fallback_layouts_shapes(kind, dtype):
    # The shapes of the GPU tests' layouts (at a budget of 300 numbers) through the CPU kernels, which
    # stage nothing: this checks the layouts and the oracle, not the GPU's staging.
    sym = fallback_layout(kind, 300, householder)
    w = torch.randn(sym.weight_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    _check(sym, w, TOL[dtype], expected=_blockwise_expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("kind", FALLBACKS)
def test_cuda_fallbacks_match_the_blockwise_projection(kind, dtype):
    if not _cuda_ready():
        pytest.skip("needs a CUDA device and the extension built with CUDA")
    if kind == "coefficients" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("half weights stage float32 numbers: the float32 case covers them (its Q_t take GBs)")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    budget = (props.shared_memory_per_block - _STATIC_SHARED_RESERVE) // acc.itemsize
    sym = fallback_layout(kind, budget, lambda m, r, seed: householder(m, r, seed, device="cuda"))
    w = torch.randn(sym.weight_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    _check(sym, w.cuda(), TOL[dtype], expected=_blockwise_expected)
    a, b = _run(sym, w.cuda()), _run(sym, w.cuda())
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    if kind != "coefficients":  # and against the CPU kernels (not for GBs of Q_t)
        for got, ref in zip(a, _run(sym, w)):
            torch.testing.assert_close(got.double().cpu(), ref.double(), rtol=TOL[dtype], atol=TOL[dtype] * 10)
