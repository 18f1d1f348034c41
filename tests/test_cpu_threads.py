"""The CPU kernels: bitwise identical results for any thread count and across processes, and signed
orbit tables (an offset o < 0 reads -W[base + ~o]) against a direct formula of the same semantics.

Shapes have several blocks and several chunks with a partial last chunk (csrc/include/cpu_orbit_batches.h
cuts a layer into chunks of whole blocks, 16384 orbit entries each: 113 blocks of C4 regular 3x3,
28 of D4 regular 3x3).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from projkernels.backends import BACKENDS
from projkernels.orbits import orbit_table

pytestmark = pytest.mark.skipif("cpp" not in BACKENDS, reason="projkernels._C is not built")

OPS = torch.ops.projkernels_C

# (group, in_rep, out_rep, shape): 255 blocks of C4 (2 full chunks and 29 blocks), 63 of D4 (2 and 7),
# a Linear and a Conv1d of many small blocks.
CASES = [
    ("C4", "regular", "regular", (60, 68, 3, 3)),
    ("D4", "regular", "regular", (72, 56, 3, 3)),
    ("C4", "trivial", "regular", (200, 150, 3, 3)),
    ("D4", "regular", "regular", (256, 264)),
    ("C2", "regular", "regular", (130, 126, 5)),
]


def test_the_kernels_run_on_every_thread_torch_is_given():
    # at::parallel_for compiled without -fopenmp runs its range on the calling thread alone, so the
    # thread-count tests below would compare one thread with itself and pass.
    from projkernels import _C
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert _C.parallel_threads(64) == n
    finally:
        torch.set_num_threads(before)


def _tables(group, ir, orr, shape):
    t = orbit_table(shape, group, ir, orr)
    return t, t.device_tables("cpu", torch.float32, spectrum=True)


def _all_results(dtype=torch.float32, seed=0):
    """Every CPU op on every case: penalty, energy, spectrum, gradient, projection, multi forward and
    backward, both decays."""
    g = torch.Generator().manual_seed(seed)
    out = []
    ws, offs, invs, geo = [], [], [], []
    for group, ir, orr, shape in CASES:
        t, dt = _tables(group, ir, orr, shape)
        w = torch.randn(shape, generator=g).to(dtype)
        n_irreps, c_out, c_in, so, si, sg = t.geometry
        pen, eq, spec = OPS.fused_forward(w, dt.offsets, dt.inv_stab, dt.basis, dt.row_irrep, n_irreps, c_out, c_in,
                                          so, si, sg, True)
        gp, ge = torch.tensor(0.75), torch.tensor(-0.25)
        grad = OPS.fused_backward(w, gp, ge, dt.offsets, dt.inv_stab, c_out, c_in, so, si, sg)
        proj = OPS.fused_backward(w, dt.zero, dt.half, dt.offsets, dt.inv_stab, c_out, c_in, so, si, sg)
        out += [pen, eq, spec, grad, proj]
        ws.append(w)
        offs.append(dt.offsets)
        invs.append(dt.inv_stab)
        geo += [c_out, c_in, so, si, sg]
    mp, me = OPS.multi_forward(ws, offs, invs, geo)
    L = len(ws)
    grads = OPS.multi_backward(ws, torch.linspace(0.5, 1.5, L), torch.linspace(-1, 1, L), offs, invs, geo)
    decayed = [w.clone() for w in ws]
    OPS.multi_decay_(decayed, offs, geo, [-0.1] * L, [-0.01] * L)
    targets = [torch.randn(w.shape, generator=g).to(dtype) for w in ws]
    OPS.multi_decay_grad_(targets, ws, offs, geo, [0.2] * L, [0.02] * L)
    return out + [mp, me] + list(grads) + decayed + targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_cpu_op_is_bitwise_identical_for_1_2_and_3_threads(dtype):
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_all_results(dtype))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        assert len(run) == len(runs[0])
        for i, (a, b) in enumerate(zip(runs[0], run)):
            assert torch.equal(a, b), i
    # Not a vacuous comparison: the values are those of real penalties.
    assert all(r.abs().sum() > 0 for r in runs[0])


def test_cpu_results_are_bitwise_identical_in_a_fresh_process(tmp_path):
    here = _all_results(torch.float32)
    path = tmp_path / "results.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        torch.set_num_threads(2)
        from test_cpu_threads import _all_results
        torch.save(_all_results(torch.float32), {str(path)!r})
    """)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=os.getcwd(), timeout=600)
    there = torch.load(path)
    assert len(there) == len(here)
    for i, (a, b) in enumerate(zip(here, there)):
        assert torch.equal(a, b), i


# --- signed tables ---------------------------------------------------------------------------------

_RHO = {"vector": np.array([[0, -1], [1, 0]]), "sign": np.array([[-1]]), "trivial": np.array([[1]])}


def _c4_signed_perms(out_rep, in_rep, kernel):
    """The signed permutations M_g = rho_out(g) (x) rho_in(g) (x) K_g of a (f_out, f_in, k, k) block for
    g = r^j of C4, as (index, sign) arrays over the block's entries ('vector': the rotation by a quarter
    turn, 'sign': (-1)^j, 'trivial': 1; K_g rotates the k x k kernel grid)."""
    k = kernel
    rot = np.zeros((k * k, k * k), dtype=int)
    for a in range(k):
        for b in range(k):
            rot[(k - 1 - b) * k + a, a * k + b] = 1
    step = np.kron(np.kron(_RHO[out_rep], _RHO[in_rep]), rot)
    mats, m = [], np.eye(step.shape[0], dtype=int)
    for _ in range(4):
        mats.append(m)
        m = step @ m
    assert (m == np.eye(step.shape[0], dtype=int)).all()  # r^4 = e: a representation of C4
    perms = []
    for mg in mats:
        idx = np.abs(mg).argmax(axis=1)
        sign = mg[np.arange(mg.shape[0]), idx]
        assert set(np.abs(sign)) == {1}
        perms.append((idx, sign))
    return perms


def _signed_table(out_rep, in_rep, kernel, c_in):
    """offsets [orbits, 4] (signed encoding), inv_stab, the field sizes and stride_in of a
    (c_out * f_out, c_in * f_in, k, k) weight."""
    perms = _c4_signed_perms(out_rep, in_rep, kernel)
    fo, fi = len(_RHO[out_rep]), len(_RHO[in_rep])
    kk = kernel * kernel
    row_len = c_in * fi * kk

    def weight_offset(x):  # block-local entry (a, b, q) -> offset from the block's base
        a, rest = divmod(int(x), fi * kk)
        b, q = divmod(rest, kk)
        return a * row_len + b * kk + q

    seen, rows, inv = set(), [], []
    for x in range(fo * fi * kk):
        if x in seen:
            continue
        ys = [int(idx[x]) for idx, _ in perms]
        seen.update(ys)
        rows.append([weight_offset(idx[x]) if sign[x] > 0 else ~weight_offset(idx[x]) for idx, sign in perms])
        inv.append(len(set(ys)) / 4)
    return torch.tensor(rows, dtype=torch.int32), torch.tensor(inv, dtype=torch.float64), fo, fi, fi * kk


def _formula(w, offsets, inv_stab, c_out, c_in, stride_out, stride_in, two_pen, two_eq, basis=None, row_irrep=None,
             n_irreps=1):
    """f[g] = s_g W[base + entry_g], mean, dev; penalty = sum inv_stab * dev^2, energy = sum inv_stab |G|
    mean^2; the gradient s_g (2 g_pen dev_g + 2 g_eq mean) written at each entry in element order; the
    spectrum from the rows of basis.  float64."""
    w = w.double().reshape(-1)
    o = offsets.long()
    sign = torch.where(o < 0, -1.0, 1.0).double()
    entry = torch.where(o < 0, ~o, o)
    fo = torch.arange(c_out)[:, None]
    fi = torch.arange(c_in)[None, :]
    base = (fo * stride_out + fi * stride_in).reshape(-1)
    idx = base[:, None, None] + entry[None]
    f = sign[None] * w[idx]
    G = f.shape[-1]
    mean = f.mean(-1, keepdim=True)
    dev = f - mean
    inv = inv_stab.double()[None, :, None]
    pen = (inv * dev ** 2).sum()
    eq = (inv[..., 0] * G * mean[..., 0] ** 2).sum()
    grad = torch.zeros_like(w)
    val = sign[None] * (two_pen * dev + two_eq * mean)
    for g in range(G):
        grad[idx[..., g].reshape(-1)] = val[..., g].reshape(-1)
    spec = None
    if basis is not None:
        spec = torch.zeros(n_irreps, dtype=torch.float64)
        spec[0] += eq
        coef = torch.einsum("rg,bog->bor", basis.double(), dev)
        rows = (inv * coef ** 2).sum((0, 1))
        for r in range(1, G):
            spec[row_irrep[r]] += rows[r]
    return pen, eq, grad, spec


SIGNED = [("vector", "vector", 3, 5, 7), ("vector", "vector", 1, 9, 4), ("sign", "trivial", 3, 6, 5),
          ("vector", "trivial", 3, 40, 70), ("sign", "vector", 1, 130, 40)]


@pytest.mark.parametrize("out_rep,in_rep,kernel,c_out,c_in", SIGNED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_signed_tables_match_the_formula(out_rep, in_rep, kernel, c_out, c_in, dtype):
    offsets, inv_stab, fo, fi, stride_in = _signed_table(out_rep, in_rep, kernel, c_in)
    assert (offsets < 0).any()  # the signed path runs
    stride_out = fo * c_in * stride_in
    shape = (c_out * fo, c_in * fi, kernel, kernel)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    basis = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    row_irrep = torch.tensor([0, 1, 2, 2])
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)

    pen, eq, spec = OPS.fused_forward(w, offsets, inv_stab, basis, row_irrep, 3, c_out, c_in, stride_out, stride_in,
                                      1, True)
    rp, re_, rg, rs = _formula(w, offsets, inv_stab, c_out, c_in, stride_out, stride_in, 1.5, -0.5, basis, row_irrep, 3)
    torch.testing.assert_close(pen.double(), rp, **tol)
    torch.testing.assert_close(eq.double(), re_, **tol)
    torch.testing.assert_close(spec.double(), rs, **tol)
    grad = OPS.fused_backward(w, torch.tensor(0.75), torch.tensor(-0.25), offsets, inv_stab, c_out, c_in, stride_out,
                              stride_in, 1)
    torch.testing.assert_close(grad.double().reshape(-1), rg, **tol)

    # The projection: P(W) from the formula, and P is a projection onto the equivariant weights of a
    # genuine group action (penalty 0, P(P(W)) = P(W)), which a kernel dropping the signs would miss.
    half = torch.tensor(0.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    zero = torch.zeros((), dtype=half.dtype)
    proj = OPS.fused_backward(w, zero, half, offsets, inv_stab, c_out, c_in, stride_out, stride_in, 1)
    _, _, rproj, _ = _formula(w, offsets, inv_stab, c_out, c_in, stride_out, stride_in, 0.0, 1.0)
    torch.testing.assert_close(proj.double().reshape(-1), rproj, **tol)
    p2, _, _ = OPS.fused_forward(proj, offsets, inv_stab, basis, row_irrep, 3, c_out, c_in, stride_out, stride_in, 1,
                                 False)
    assert float(p2) <= 1e-6 * float(pen)
    torch.testing.assert_close(
        OPS.fused_backward(proj, zero, half, offsets, inv_stab, c_out, c_in, stride_out, stride_in, 1), proj, **tol)

    # The multi-tensor ops: a signed layer beside an unsigned one, each its single-weight result.
    t, dt = _tables("C4", "regular", "regular", (8, 12, 3, 3))
    w2 = torch.randn(8, 12, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    geo = [c_out, c_in, stride_out, stride_in, 1] + t.geometry[1:]
    mp, me = OPS.multi_forward([w, w2], [offsets, dt.offsets], [inv_stab, dt.inv_stab], geo)
    assert torch.equal(mp[0], pen) and torch.equal(me[0], eq)
    mg = OPS.multi_backward([w, w2], torch.tensor([0.75, 1.0]), torch.tensor([-0.25, 0.0]), [offsets, dt.offsets],
                            [inv_stab, dt.inv_stab], geo)
    assert torch.equal(mg[0], grad)

    # The decay: W + c_dev (W - P W) + c_mean P W, and grad + the same terms of W.
    pw = rproj.reshape(shape)
    decayed = w.clone()
    OPS.multi_decay_([decayed], [offsets], geo[:5], [-0.3], [-0.05])
    torch.testing.assert_close(decayed.double(), w.double() - 0.3 * (w.double() - pw) - 0.05 * pw, **tol)
    target = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    expect = target.double() + 0.3 * (w.double() - pw) + 0.05 * pw
    OPS.multi_decay_grad_([target], [w], [offsets], geo[:5], [0.3], [0.05])
    torch.testing.assert_close(target.double(), expect, **tol)


def test_a_signed_offset_outside_the_weight_is_refused():
    offsets, inv_stab, f, _, stride_in = _signed_table("vector", "vector", 3, 2)
    bad = offsets.clone()
    bad[0, 1] = -(10 ** 6)
    w = torch.randn(2 * f, 2 * f, 3, 3)
    with pytest.raises(RuntimeError, match="reach outside"):
        OPS.fused_forward(w, bad, inv_stab, torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 1, 2,
                          2, f * 2 * stride_in, stride_in, 1, False)
