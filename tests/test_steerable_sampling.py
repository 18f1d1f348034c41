"""Steerable bases with a large ``frequencies_cutoff``: the basis is escnn's analytic one sampled in
float64, and its rank is decided with a clear spectral gap, so escnn's float32 sampling residue never
becomes basis.

Where the finite group maps the kernel grid onto itself (quarter turns, and the flips of D4), every
element of escnn's basis is exactly equivariant on the grid, so P(W) must have zero group-average
penalty to float64 rounding, and the steerable dimension can be checked against the grid-equivariant
dimension, counted here independently by characters: dim Hom_G(in x grid, out) =
(1/|G|) sum_g chi_grid(g) chi_in(g) chi_out(g), with chi_grid(g) the number of grid points g fixes.
"""
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

import projkernels as pk  # noqa: E402
from projkernels.escnn_interop import steerable_from_layer  # noqa: E402


def _gspace(name):
    return {"C4": lambda: gspaces.rot2dOnR2(4), "D4": lambda: gspaces.flipRot2dOnR2(4),
            "C8": lambda: gspaces.rot2dOnR2(8)}[name]()


def _field(gs, kind):
    if kind == "mixed":
        g = gs.fibergroup
        two = [r for r in g.irreps() if r.size == 2][0]
        return enn.FieldType(gs, [gs.trivial_repr, gs.regular_repr, two])
    return enn.FieldType(gs, [getattr(gs, f"{kind}_repr")])


def _grid_elements(gs):
    """The group elements that map the k x k grid onto itself (the quarter turns, with the flips on a
    flipRot2dOnR2 gspace), with their 2 x 2 action on the plane."""
    out = []
    for g in gs.fibergroup.elements:
        a = np.asarray(gs.basespace_action(g))
        if np.allclose(a, np.round(a), atol=1e-9):
            out.append((g, np.round(a)))
    return out


def _turn(gs, turns):
    """The rotation by ``turns`` quarter turns, as an element of the gspace's group."""
    n = gs.rotations_order
    return gs.fibergroup.element((0, turns * n // 4) if gs.flips_order else turns * n // 4)


def _grid_dim(fi, fo, k):
    """dim of the kernels on the k x k grid that commute with the grid-preserving elements (characters)."""
    pts = np.array([(x, y) for x in range(-(k // 2), k // 2 + 1) for y in range(-(k // 2), k // 2 + 1)], float)
    total, elems = 0.0, _grid_elements(fi.gspace)
    for g, a in elems:
        fixed = int(np.all(np.abs(pts @ a.T - pts) < 1e-9, axis=1).sum())
        total += fixed * np.trace(fi.representation(g)) * np.trace(fo.representation(g))
    dim = total / len(elems)
    assert abs(dim - round(dim)) < 1e-9
    return round(dim)


def _quarter_turn_error(sym, w, fi, fo, k):
    """Relative equivariance error of conv2d(w) under the quarter turns (exact on the grid), with
    escnn's representations of the rotation by ``turns * pi / 2``."""
    x = torch.randn(2, fi.size, 11, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    errs = []
    for turns in (1, 2, 3):
        g = _turn(fi.gspace, turns)
        assert np.allclose(fi.gspace.basespace_action(g), [[0, -1], [1, 0]] if turns == 1 else
                           np.linalg.matrix_power([[0, -1], [1, 0]], turns), atol=1e-9)
        rin = torch.tensor(fi.representation(g), dtype=torch.float64)
        rout = torch.tensor(fo.representation(g), dtype=torch.float64)
        lhs = F.conv2d(torch.einsum("ij,bjhw->bihw", rin, torch.rot90(x, turns, (2, 3))), w, padding=k // 2)
        rhs = torch.einsum("ij,bjhw->bihw", rout, torch.rot90(F.conv2d(x, w, padding=k // 2), turns, (2, 3)))
        errs.append(float((lhs - rhs).norm() / rhs.norm()))
    return max(errs)


def _projected(sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pk.project(torch.randn(sym.weight_shape, generator=g, dtype=torch.float64), sym)


# (gspace, field kind, kernel size, frequencies_cutoff): the finite-group penalty applies to a single
# representation; escnn's float32 basis gave 9 / 112 / 224 dimensions for the three cutoff-10 cases.
SINGLE = [("C4", "trivial", 5, 10.0, 7), ("C4", "regular", 5, 10.0, 100), ("D4", "regular", 5, 10.0, 200),
          ("C4", "trivial", 7, 12.0, 13), ("C4", "trivial", 3, 10.0, 3), ("D4", "trivial", 7, 10.0, 10)]


@pytest.mark.parametrize("group,kind,k,cutoff,grid_dim", SINGLE)
def test_large_cutoff_basis_is_exactly_grid_equivariant(group, kind, k, cutoff, grid_dim):
    gs = _gspace(group)
    ft = _field(gs, kind)
    assert _grid_dim(ft, ft, k) == grid_dim  # the character count agrees with the expected dimension
    sym = pk.steerable(ft, ft, k, frequencies_cutoff=cutoff)
    assert sym.dim == grid_dim  # at these cutoffs escnn's basis spans every grid-equivariant kernel
    w = _projected(sym)
    total = float(w.square().sum())
    # zero group-average penalty up to float64 rounding (escnn's float32 basis: 1e-1 to 4e-1 of ||P W||^2)
    assert float(pk.projected_penalty(w, group, kind, kind)) <= 1e-24 * total
    q = sym.dense_basis()  # and every basis direction, not just one random P(W)
    eye = q.T.reshape(-1, *sym.weight_shape)
    worst = max(float(pk.projected_penalty(e, group, kind, kind)) for e in eye)
    assert worst <= 1e-24


@pytest.mark.parametrize("group,k,cutoff", [("C4", 3, 10.0), ("C8", 5, 10.0)])
def test_mixed_fields_commute_with_quarter_turns(group, k, cutoff):
    """Mixed trivial / regular / 2-d irrep fields: conv2d(P(W)) commutes with the quarter turns to
    float64 rounding.  C8 acts exactly on the grid only through its C4 subgroup: its basis lies inside
    the C4-equivariant kernels (with C8's representations restricted to the quarter turns)."""
    gs = _gspace(group)
    ft = _field(gs, "mixed")
    sym = pk.steerable(ft, ft, k, frequencies_cutoff=cutoff)
    w = _projected(sym, seed=1)
    assert _quarter_turn_error(sym, w, ft, ft, k) < 1e-13
    grid = _grid_dim(ft, ft, k)
    if group == "C8":
        assert 0 < sym.dim < grid  # 2 x 2 rotation-invariant on a grid: strictly inside the C4 space
    else:
        assert sym.dim == grid


def test_layer_import_resamples_in_float64():
    """A layer read by steerable_from_layer gets the same float64 basis as steerable() with its options."""
    gs = _gspace("C4")
    ft = _field(gs, "regular")
    layer = enn.R2Conv(ft, ft, 5, bias=False, frequencies_cutoff=10.0)
    sym = steerable_from_layer(layer)
    ref = pk.steerable(ft, ft, 5, frequencies_cutoff=10.0)
    assert sym.dim == ref.dim == 100
    w = _projected(ref, seed=3)
    torch.testing.assert_close(pk.project(w, sym), w, rtol=0, atol=1e-12)
    assert float(pk.projected_penalty(_projected(sym, seed=4), "C4", "regular", "regular")) <= 1e-24 * sym.numel


def test_rank_is_decided_for_the_whole_layer_and_an_unclear_spectrum_raises(monkeypatch):
    """The dense basis assembled from the block types is orthonormal with the layer's dimension, and a
    spectrum with values inside the required gap raises an error that names the configuration (here the
    gap is widened on purpose until it reaches basis directions)."""
    import importlib
    st = importlib.import_module("projkernels.symmetry.steerable")
    gs = _gspace("C8")
    ft = _field(gs, "mixed")
    sym = pk.steerable(ft, ft, 5, frequencies_cutoff=10.0)
    q = sym.dense_basis()
    assert q.shape[1] == sym.dim
    torch.testing.assert_close(q.T @ q, torch.eye(sym.dim, dtype=torch.float64), rtol=0, atol=1e-12)
    # an artificially widened gap that reaches into the basis' spectrum must raise, naming the layer
    monkeypatch.setattr(st, "_SIGNAL_RTOL", 0.9, raising=False)
    fresh = enn.FieldType(gs, [gs.trivial_repr, gs.regular_repr])
    with pytest.raises(ValueError, match=r"kernel_size=3, frequencies_cutoff=9\.0.*no clear rank"):
        pk.steerable(fresh, fresh, 3, frequencies_cutoff=9.0)
