"""Steerable symmetries: the projection onto the span of escnn's sampled basis, block by block.

The oracle is built independently of projkernels' block layout: the escnn layer itself is expanded
from every unit coefficient vector, giving its basis as N x D columns of the weight, and QR makes
the dense orthogonal projection.  Every route must agree with it.
"""
import functools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if os.environ.get("PROJKERNELS_REQUIRE_ESCNN") == "1":
    import escnn  # noqa: F401  (CI sets the variable: there these checks must run, not skip)
else:
    escnn = pytest.importorskip("escnn", reason="escnn is an optional test dependency (pip install '.[escnn]')")
from escnn import gspaces, nn as enn  # noqa: E402
from escnn.group import o2_group, so2_group, so3_group  # noqa: E402

import projkernels as pk  # noqa: E402
from projkernels.symmetry.steerable import SteerableSymmetry  # noqa: E402


def triton_device() -> str:
    """Where the Triton route runs here: the GPU when there is one, Triton's interpreter otherwise."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _o3_gspace():
    # escnn 1.0.x names O(3) on R^3 flipRot3dOnR3 (fullRot3dOnR3 in some releases)
    return getattr(gspaces, "fullRot3dOnR3", None) or gspaces.flipRot3dOnR3


def _types(name):
    """(in_type, out_type, kernel_size) of each case: small, mixed field types, both continuous and
    discrete groups, Linear, Conv2d and Conv3d weights."""
    if name == "so2_conv2d":
        gs = gspaces.rot2dOnR2(-1)
        return (enn.FieldType(gs, [gs.irrep(0), gs.irrep(1), gs.irrep(0)]),
                enn.FieldType(gs, [gs.irrep(1), gs.irrep(2), gs.irrep(0), gs.irrep(1)]), 5)
    if name == "so2_conv2d_uneven":
        # fields of one representation at unevenly spaced channels (the index route, not strided views)
        gs = gspaces.rot2dOnR2(-1)
        return (enn.FieldType(gs, [gs.irrep(0), gs.irrep(1), gs.irrep(1), gs.irrep(0), gs.irrep(0)]),
                enn.FieldType(gs, [gs.irrep(1), gs.irrep(0), gs.irrep(0), gs.irrep(2), gs.irrep(1)]), 3)
    if name == "o2_conv2d":
        gs = gspaces.flipRot2dOnR2(-1)
        return (enn.FieldType(gs, [gs.irrep(0, 0), gs.irrep(1, 1)]),
                enn.FieldType(gs, [gs.irrep(1, 2), gs.irrep(1, 1), gs.irrep(0, 0)]), 3)
    if name == "so3_conv3d":
        gs = gspaces.rot3dOnR3()
        return enn.FieldType(gs, [gs.irrep(0), gs.irrep(1)]), enn.FieldType(gs, [gs.irrep(1), gs.irrep(0)]), 3
    if name == "o3_conv3d":
        gs = _o3_gspace()()
        return (enn.FieldType(gs, [gs.irrep(0, 0), gs.irrep(1, 1)]),
                enn.FieldType(gs, [gs.irrep(1, 1), gs.irrep(0, 1)]), 3)
    if name == "c4_regular_conv2d":
        gs = gspaces.rot2dOnR2(4)
        return (enn.FieldType(gs, [gs.trivial_repr, gs.regular_repr]),
                enn.FieldType(gs, [gs.regular_repr] * 2), 3)
    if name == "d4_regular_conv2d":
        gs = gspaces.flipRot2dOnR2(4)
        return enn.FieldType(gs, [gs.regular_repr]), enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr]), 3
    if name == "so2_linear":
        G = so2_group(4)
        gs = gspaces.no_base_space(G)
        return (enn.FieldType(gs, [G.irrep(0), G.irrep(1), G.irrep(2), G.irrep(1)]),
                enn.FieldType(gs, [G.irrep(1), G.irrep(0), G.irrep(3), G.irrep(2)]), None)
    if name == "o2_linear":
        G = o2_group(3)
        gs = gspaces.no_base_space(G)
        return (enn.FieldType(gs, [G.irrep(0, 0), G.irrep(1, 1), G.irrep(1, 2)]),
                enn.FieldType(gs, [G.irrep(1, 1), G.irrep(1, 0), G.irrep(0, 0)]), None)
    if name == "so3_linear":
        G = so3_group(2)
        gs = gspaces.no_base_space(G)
        return (enn.FieldType(gs, [G.irrep(0), G.irrep(1), G.irrep(2), G.irrep(1)]),
                enn.FieldType(gs, [G.irrep(1), G.irrep(2), G.irrep(0)]), None)
    raise KeyError(name)


CASES = ["so2_conv2d", "so2_conv2d_uneven", "o2_conv2d", "so3_conv3d", "o3_conv3d", "c4_regular_conv2d", "d4_regular_conv2d",
         "so2_linear", "o2_linear", "so3_linear"]


@functools.lru_cache(maxsize=None)
def case(name):
    fi, fo, k = _types(name)
    return pk.steerable(fi, fo, k), _layer(fi, fo, k)


def _layer(fi, fo, k):
    d = fi.gspace.dimensionality
    if d == 0:
        return enn.Linear(fi, fo, bias=False)
    return (enn.R2Conv if d == 2 else enn.R3Conv)(fi, fo, k, bias=False)


def _expand(layer, coeffs):
    with torch.no_grad():
        layer.weights.copy_(coeffs.to(layer.weights.dtype))
        return layer.expand_parameters()[0].detach().clone()


@functools.lru_cache(maxsize=None)
def dense_projection(name):
    """P (N x N, float64) from the escnn layer's own expansion of every unit coefficient vector."""
    sym, layer = case(name)
    layer = layer.double()
    n = layer.weights.numel()
    cols = torch.stack([_expand(layer, torch.eye(n, dtype=torch.float64)[i]).reshape(-1) for i in range(n)], 1)
    q, r = torch.linalg.qr(cols)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    q = q[:, keep]
    return q @ q.T, int(keep.sum())


def _random(sym, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sym.weight_shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("name", CASES)
def test_escnn_weights_have_zero_penalty(name):
    sym, layer = case(name)
    layer = layer.double()
    g = torch.Generator().manual_seed(1)
    w = _expand(layer, torch.randn(layer.weights.shape, generator=g, dtype=torch.float64))
    pen, eq = pk.penalty_and_energy(w, sym)
    assert pen.dtype == torch.float64
    total = float(w.square().sum())
    assert total > 0
    assert float(pen) <= 1e-10 * total
    assert float(eq) == pytest.approx(total, rel=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_matches_the_dense_projection_of_the_layer_basis(name):
    sym, _ = case(name)
    P, rank = dense_projection(name)
    assert sym.dim == rank  # the SVD's rank tolerance keeps exactly escnn's basis dimension
    w = _random(sym)
    pw = (P @ w.reshape(-1)).reshape(w.shape)
    pen, eq = pk.penalty_and_energy(w, sym)
    # The oracle expands escnn's float32 samples; projkernels samples the same analytic basis in float64
    # (tests/test_steerable_sampling.py), so the two spans agree to escnn's float32 sampling error.
    assert float(pen) == pytest.approx(float((w - pw).square().sum()), rel=1e-6)
    assert float(eq) == pytest.approx(float(pw.square().sum()), rel=1e-6, abs=1e-12)
    torch.testing.assert_close(pk.project(w, sym), pw, rtol=0, atol=1e-5)
    # the dense basis built from projkernels' blocks spans the same space
    q = sym.dense_basis()
    torch.testing.assert_close(q @ q.T, P, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["so2_conv2d", "c4_regular_conv2d", "so3_linear"])
def test_projection_is_idempotent_and_self_adjoint(name):
    sym, _ = case(name)
    a, b = _random(sym, seed=2), _random(sym, seed=3)
    pa, pb = pk.project(a, sym), pk.project(b, sym)
    torch.testing.assert_close(pk.project(pa, sym), pa, rtol=0, atol=1e-13)
    assert float((pa * b).sum()) == pytest.approx(float((a * pb).sum()), rel=1e-12)
    # penalty + energy = ||W||^2 (both from their own sums: a consistency check, not how either is computed)
    pen, eq = pk.penalty_and_energy(a, sym)
    assert float(pen + eq) == pytest.approx(float(a.square().sum()), rel=1e-12)


def test_penalty_is_accurate_for_nearly_equivariant_weights():
    # A weight 1e-9 away from the equivariant space: ||W||^2 - ||PW||^2 would lose every digit of the
    # 1e-18-sized penalty; the residual keeps them.
    sym, _ = case("so2_conv2d")
    w = _random(sym, seed=4)
    pw = pk.project(w, sym)
    d = w - pw
    d = d / d.norm() * 1e-9
    pen = pk.projected_penalty(pw + d, sym)
    assert float(pen) == pytest.approx(1e-18, rel=1e-6)


@pytest.mark.parametrize("name", ["o2_conv2d", "so3_linear"])
def test_gradcheck(name):
    sym, _ = case(name)
    w = _random(sym, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pk.penalty_and_energy(x, sym), (w,))
    assert torch.autograd.gradcheck(lambda x: pk.project(x, sym), (w,))
    pen, eq = pk.penalty_and_energy(w, sym)
    g_pen, = torch.autograd.grad(pen, w)
    pw = pk.project(w.detach(), sym)
    torch.testing.assert_close(g_pen, 2 * (w.detach() - pw), rtol=0, atol=1e-12)


def _triton_or_skip():
    if "triton" not in pk.available_backends(triton_device()):
        pytest.skip("Triton is not available on " + triton_device())
    return triton_device()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["so2_conv2d", "so2_conv2d_uneven", "c4_regular_conv2d", "so3_linear", "o3_conv3d"])
def test_triton_agrees_with_reference(name, dtype):
    device = _triton_or_skip()
    sym, _ = case(name)
    w = _random(sym, dtype, seed=6).to(device).requires_grad_()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    # element-wise outputs in the weight's dtype: one rounding of the float32 (float64) value each
    etol = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=1e-2, atol=2e-2)}[dtype]
    pr, er = pk.penalty_and_energy(w, sym, backend="reference")
    pt, et = pk.penalty_and_energy(w, sym, backend="triton")
    assert pt.dtype == pr.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(pt, pr, **tol)
    torch.testing.assert_close(et, er, **tol)
    gr, = torch.autograd.grad(pr + 0.5 * er, w)
    gt, = torch.autograd.grad(pt + 0.5 * et, w)
    assert gt.dtype == dtype
    torch.testing.assert_close(gt.double(), gr.double(), **etol)
    projr = pk.project(w, sym, backend="reference")
    projt = pk.project(w, sym, backend="triton")
    assert projt.dtype == dtype
    torch.testing.assert_close(projt.double(), projr.double(), **etol)


def test_triton_project_gradient_is_the_projection():
    device = _triton_or_skip()
    sym, _ = case("o2_conv2d")
    w = _random(sym, seed=7).to(device).requires_grad_()
    g = _random(sym, seed=8).to(device)
    got, = torch.autograd.grad(pk.project(w, sym, backend="triton"), w, g)
    torch.testing.assert_close(got, pk.project(g, sym, backend="reference"), rtol=0, atol=1e-12)


def test_half_weights_accumulate_in_float32():
    sym, _ = case("so2_conv2d")
    w = _random(sym, seed=9).half()
    pen, eq = pk.penalty_and_energy(w, sym)
    assert pen.dtype == eq.dtype == torch.float32
    p64, e64 = pk.penalty_and_energy(w.double(), sym)
    assert float(pen) == pytest.approx(float(p64), rel=1e-5)
    assert pk.project(w, sym).dtype == torch.float16


def test_conv2d_with_projected_weight_commutes_with_quarter_turns():
    """Rotations by multiples of 90 degrees map the grid onto itself, so P(W) gives an equivariant
    conv up to the error of escnn's float32 sampling of its basis; that error is reported."""
    fi, fo, k = _types("so2_conv2d")
    sym, _ = case("so2_conv2d")
    w = _random(sym, seed=10)
    pw = pk.project(w, sym)
    x = torch.randn(2, fi.size, 13, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    errs, raw = [], []
    for turns in (1, 2, 3):
        g = fi.gspace.fibergroup.element(turns * np.pi / 2)
        rin = torch.tensor(fi.representation(g), dtype=torch.float64)
        rout = torch.tensor(fo.representation(g), dtype=torch.float64)
        act_in = torch.einsum("ij,bjhw->bihw", rin, torch.rot90(x, turns, (2, 3)))
        for weight, out in ((pw, errs), (w, raw)):
            lhs = F.conv2d(act_in, weight, padding=k // 2)
            rhs = torch.einsum("ij,bjhw->bihw", rout, torch.rot90(F.conv2d(x, weight, padding=k // 2), turns, (2, 3)))
            out.append(float((lhs - rhs).norm() / rhs.norm()))
    print(f"relative equivariance error of conv2d(P(W)) under quarter turns: {max(errs):.2e} "
          f"(escnn samples its basis in float32); unprojected W: {min(raw):.2e}")
    assert max(errs) < 1e-5
    assert min(raw) > 0.1  # the check can fail: a random weight is far from equivariant


@pytest.mark.parametrize("group,rep,k,steer_dim,grid_dim", [
    ("C4", "regular", 3, 24, 36), ("C4", "regular", 5, 44, 100), ("D4", "regular", 5, 88, 200),
    ("C4", "trivial", 5, 3, 7)])
def test_band_limited_span_inside_the_group_average_space(group, rep, k, steer_dim, grid_dim):
    """escnn's basis spans a strict subspace of the grid-equivariant weights that the finite-group
    penalty measures the distance to; both dimensions are pinned here (they appear in the docs)."""
    gs = gspaces.rot2dOnR2(4) if group == "C4" else gspaces.flipRot2dOnR2(4)
    r = getattr(gs, f"{rep}_repr")
    sym = pk.steerable(enn.FieldType(gs, [r]), enn.FieldType(gs, [r]), k)
    assert sym.dim == steer_dim
    eye = torch.eye(sym.numel, dtype=torch.float64).reshape(sym.numel, *sym.weight_shape)
    # trace of the group-average projection = the dimension of its space
    assert round(sum(float(pk.equivariant_energy(e, group, rep, rep)) for e in eye)) == grid_dim
    w = pk.project(_random(sym, seed=12), sym)
    # inside up to escnn's float32 sampling of its basis (relative distance ~1e-7)
    assert float(pk.projected_penalty(w, group, rep, rep)) <= 1e-12 * float(w.square().sum())


def test_multi_penalty_and_model_penalty_mix_steerable_and_finite_layers():
    sym, _ = case("so2_conv2d")
    lin = torch.nn.Linear(8, 8)
    conv = torch.nn.Conv2d(4, 7, 5, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(_random(sym, seed=13))
    pk.attach_symmetry(conv, sym)
    pk.attach_symmetry(lin, "C4", "regular", "regular")
    lin.double()
    model = torch.nn.Sequential(conv, lin)
    items = [(lin.weight, "C4", "regular", "regular"), (conv.weight, sym, "trivial", "trivial")]
    total, eq, per, per_eq = pk.multi_penalty(items)
    p_conv = pk.projected_penalty(conv.weight, sym)
    p_lin = pk.projected_penalty(lin.weight, "C4", "regular", "regular")
    torch.testing.assert_close(per, torch.stack([p_lin, p_conv]).detach(), rtol=1e-12, atol=0, check_dtype=False)
    mp = pk.model_penalty(model, bias=False)
    assert float(mp.detach()) == pytest.approx(float((p_conv + p_lin).detach()), rel=1e-12)
    mp.backward()
    torch.testing.assert_close(conv.weight.grad, 2 * (conv.weight - pk.project(conv.weight, sym)).detach())
    pk.project_(model)
    assert float(pk.projected_penalty(conv.weight, sym)) <= 1e-25


def test_same_arguments_give_the_same_symmetry():
    fi, fo, k = _types("so2_conv2d")
    assert pk.steerable(fi, fo, k) is pk.steerable(fi, fo, k)
    assert isinstance(pk.steerable(fi, fo, k), SteerableSymmetry)
    assert "SO(2)" in str(pk.steerable(fi, fo, k))


def test_errors_name_the_argument():
    sym, _ = case("so2_conv2d")
    fi, fo, _ = _types("so2_conv2d")
    with pytest.raises(ValueError, match="backend: 'numpy' does not serve steerable symmetries.*'reference'"):
        pk.projected_penalty(_random(sym), sym, backend="numpy")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' cannot serve this steerable symmetry on cpu"):
            pk.projected_penalty(_random(sym), sym, backend="cuda")
    with pytest.raises(ValueError, match=r"weight: shape \(7, 4, 3, 3\) does not match"):
        pk.projected_penalty(torch.zeros(7, 4, 3, 3), sym)
    with pytest.raises(ValueError, match="in_rep/out_rep"):
        pk.projected_penalty(_random(sym), sym, "regular", "regular")
    with pytest.raises(ValueError, match="kernel_size: a positive int is required"):
        pk.steerable(fi, fo)
    with pytest.raises(TypeError, match="in_type: expected an escnn.nn.FieldType"):
        pk.steerable("C4", fo, 3)
    with pytest.raises(TypeError, match="Conv2d weight, got Linear"):
        pk.attach_symmetry(torch.nn.Linear(4, 7), sym)
    with pytest.raises(ValueError, match="backend: 'numpy' does not serve"):
        pk.attach_symmetry(torch.nn.Conv2d(4, 7, 5), sym, backend="numpy")
    with pytest.raises(NotImplementedError, match="spectrum"):
        pk.spectrum(_random(sym), sym)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compiles_in_one_graph(backend):
    # "reference": the Python autograd traced by Dynamo (its Functions without their jvp rules).
    sym, _ = case("o2_conv2d")
    w = _random(sym, seed=14).requires_grad_()
    f = torch.compile(lambda x: pk.projected_penalty(x, sym, backend=backend)
                      + pk.project(x, sym, backend=backend).square().sum(), fullgraph=True, backend="eager")
    got = f(w)
    want = pk.projected_penalty(w, sym, backend=backend) + pk.project(w, sym, backend=backend).square().sum()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    g1, = torch.autograd.grad(got, w)
    g2, = torch.autograd.grad(want, w)
    torch.testing.assert_close(g1, g2)


def test_without_escnn_the_error_says_what_to_install(monkeypatch):
    import builtins
    from projkernels.symmetry.steerable import _escnn
    real = builtins.__import__

    def no_escnn(name, *args, **kwargs):
        if name == "escnn" or name.startswith("escnn."):
            raise ImportError("No module named 'escnn'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_escnn)
    # projkernels is on no package index, so "pip install projkernels[escnn]" cannot work: the hint
    # names escnn itself.
    with pytest.raises(ImportError, match=r"needs escnn.*pip install escnn") as info:
        _escnn()
    assert "projkernels[" not in str(info.value)


def test_equivariance_report_lists_steerable_layers():
    sym, _ = case("so2_linear")
    lin = torch.nn.Linear(7, 7, bias=False).double()
    pk.attach_symmetry(lin, sym)
    (row,) = pk.equivariance_report(torch.nn.Sequential(lin))
    pen = float(pk.projected_penalty(lin.weight.detach(), sym))
    assert row["penalty"] == pytest.approx(pen, rel=1e-12)
    assert sum(row["spectrum"].values()) == pytest.approx(float(lin.weight.detach().square().sum()), rel=1e-12)
    assert "SO(2)" in pk.format_report([row])


def test_multi_penalty_under_compile_takes_steerable_items():
    sym, _ = case("o2_conv2d")
    w = _random(sym, seed=15)
    v = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    items = [(w, sym, "trivial", "trivial"), (v, "C4", "regular", "regular")]
    got = torch.compile(lambda: pk.multi_penalty(items)[2], backend="eager")()
    torch.testing.assert_close(got, pk.multi_penalty(items)[2], rtol=1e-12, atol=0)


def test_copies_of_a_model_share_the_symmetry_and_pickling_says_why_not():
    import copy
    import pickle
    sym, _ = case("so2_linear")
    lin = torch.nn.Linear(7, 7, bias=False)
    pk.attach_symmetry(lin, sym)
    assert pk.get_symmetry(copy.deepcopy(lin)).group is sym
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(lin)


@pytest.mark.parametrize("name", ["so2_conv2d", "so2_conv2d_uneven"])
def test_weights_that_are_views_of_a_larger_buffer(name):
    # a weight with a storage offset (a slice of a flat parameter buffer) and a non-contiguous one
    sym, _ = case(name)
    w = _random(sym, seed=16)
    buf = torch.zeros(w.numel() + 5, dtype=torch.float64)
    buf[5:] = w.reshape(-1)
    view = buf[5:].view(w.shape).requires_grad_()
    pen, eq = pk.penalty_and_energy(view, sym)
    want_pen, want_eq = pk.penalty_and_energy(w, sym)
    assert float(pen.detach()) == pytest.approx(float(want_pen), rel=1e-13)
    g, = torch.autograd.grad(pen, view)
    torch.testing.assert_close(g, 2 * (w - pk.project(w, sym)), rtol=0, atol=1e-12)
    torch.testing.assert_close(pk.project(view.detach(), sym), pk.project(w, sym), rtol=0, atol=0)
    wt = w.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not wt.is_contiguous()
    assert float(pk.projected_penalty(wt, sym)) == pytest.approx(float(want_pen), rel=1e-13)
