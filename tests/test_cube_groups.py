"""The cube groups O, Oh and T on Conv3d weights: their tables, their kernel action, and what P(W)
means for a 3-D convolution (docs/design.md, Conventions).

escnn agreement (element order, law, regular representation, irreps, R3Conv weights) is checked in
tests/test_escnn.py; every backend against the dense oracle in tests/test_conformance.py.  Here:
the group laws from the matrices, the action against rot90 / flip of the voxel grid, and the
property the penalty exists for: a conv3d with P(W) commutes with the group acting on the input
volume, and with a random W it does not.
"""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import projkernels as pk
from projkernels.groups import full_octahedral, octahedral, tetrahedral

from cases import grid_action, seeded_weight

CUBE = ["O", "Oh", "T"]


# --- the tables -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CUBE)
def test_law_is_matrix_multiplication(name):
    G = pk.get_group(name)
    mats = G.matrices
    assert G.order == {"O": 24, "Oh": 48, "T": 12}[name] and mats.shape == (G.order, 3, 3)
    # signed permutation matrices, all distinct, rotations (det 1) except Oh's second half
    assert (np.abs(mats).sum(axis=1) == 1).all() and (np.abs(mats).sum(axis=2) == 1).all()
    assert len({m.tobytes() for m in mats}) == G.order
    det = np.rint(np.linalg.det(mats))
    assert (det == (np.repeat([1, -1], 24) if name == "Oh" else 1)).all()
    for a in range(G.order):
        for b in range(G.order):
            assert (mats[G.mul[a, b]] == mats[a] @ mats[b]).all()
    assert G.identity == 3 and (mats[3] == np.eye(3)).all()  # escnn's order: the identity is 4th
    assert all(G.mul[g, G.inverse[g]] == G.identity for g in range(G.order))
    assert G.kernel_ndim == 3 and G.has_reflections == (name == "Oh")


def test_subgroups_and_element_order():
    O, Oh, T = octahedral(), full_octahedral(), tetrahedral()
    assert (Oh.matrices[:24] == O.matrices).all() and (Oh.matrices[24:] == -O.matrices).all()
    assert (T.matrices == O.matrices[:12]).all() and (T.mul == O.mul[:12, :12]).all()
    assert Oh.elements == tuple((f, j) for f in (0, 1) for j in range(24))
    # escnn's order: half turns about x, y, z, the identity, eight 120-degree turns (T), then the rest of O
    assert [int(np.trace(m)) for m in O.matrices[:12]] == [-1, -1, -1, 3] + [0] * 8
    assert (O.matrices[0] == np.diag([1, -1, -1])).all() and (O.matrices[2] == np.diag([-1, -1, 1])).all()
    assert (O.matrices[12] == [[1, 0, 0], [0, 0, -1], [0, 1, 0]]).all()  # a quarter turn about x
    # T is the rotations of the cube that keep the tetrahedron on the vertices with x y z > 0
    vertices = np.array([v for v in itertools.product((-1, 1), repeat=3) if np.prod(v) > 0])
    keeps = [{tuple(x) for x in vertices @ m.T} == {tuple(x) for x in vertices} for m in O.matrices]
    assert keeps == [True] * 12 + [False] * 12


@pytest.mark.parametrize("name", CUBE)
def test_irreps_are_orthonormal_and_complete(name):
    G = pk.get_group(name)
    chars = G.characters
    gram = chars @ chars.T / G.order
    assert np.allclose(gram, np.diag(np.diag(gram)))
    # O and Oh: all irreps of real type; T: its 2-D real irrep is of complex type
    expected = {"O": [1] * 5, "Oh": [1] * 10, "T": [1, 1, 2]}[name]
    assert np.allclose(np.diag(gram), expected)
    basis, owner = G.isotypic_basis
    assert np.allclose(basis @ basis.T, np.eye(G.order)) and np.allclose(basis[0], 1 / np.sqrt(G.order))
    dims = np.array(G.irrep_dims)
    assert (np.bincount(owner, minlength=len(dims)) == dims * dims // np.array(expected)).all()
    # characters are class functions: chi(h g h^-1) = chi(g)
    for h in range(G.order):
        conj = G.mul[G.mul[h], G.inverse[h]]
        assert np.allclose(chars[:, conj], chars)
    assert (chars[:, G.identity] == dims).all()


def test_irrep_names():
    assert pk.irrep_names("O") == ("irrep_0", "irrep_1", "irrep_-1", "irrep_2", "irrep_3")
    assert pk.irrep_names("O") == tuple(octahedral().irrep_names)
    assert pk.irrep_names("Oh")[:2] == ("irrep_[(0,),(0,)](0)", "irrep_[(0,),(1,)](0)")
    assert pk.irrep_names("Oh")[5:7] == ("irrep_[(1,),(0,)](0)", "irrep_[(1,),(1,)](0)")
    assert len(pk.irrep_names("Oh")) == 10
    assert pk.irrep_names("T") == ("irrep_0", "irrep_1", "irrep_2")
    assert pk.get_group("O").irrep_dims == (1, 3, 3, 2, 1) and pk.get_group("T").irrep_dims == (1, 3, 2)


def test_names_are_strict():
    assert pk.get_group("O") is pk.get_group("O") is octahedral() and pk.get_group("Oh").order == 48
    for bad in ["o", "oh", "OH", "oH", " O", "Oh ", "t", "O h"]:
        with pytest.raises(ValueError, match=r"is not a group name; expected .*'O', 'Oh', 'T'"):
            pk.get_group(bad)
    with pytest.raises(ValueError, match="unknown group 'Th'"):
        pk.get_group("Th")
    for reserved in ["O", "Oh", "oh", "T"]:
        fake = pk.FiniteGroup(reserved, ((0, 0),), np.zeros((1, 1), dtype=np.int64), ("0",), (1,), np.ones((1, 1)),
                              1, False, lambda k, e, n: k)
        with pytest.raises(ValueError, match="reserved"):
            pk.register_group(fake)
        with pytest.raises(ValueError, match="reserved"):
            pk.projected_penalty(torch.randn(2, 2), fake)


# --- the kernel action ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", CUBE)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_kernel_action_is_the_grid_rotation(name, k):
    """T_g moves the kernel as g moves the grid's points (the point-by-point restatement), composes
    like the group, and leaves 1x1x1 and kernel-free weights alone."""
    G = pk.get_group(name)
    x = torch.randn(2, 3, k, k, k, dtype=torch.float64)
    moved = [G.kernel_action(x, g) for g in range(G.order)]
    for g in range(G.order):
        assert torch.equal(moved[g], grid_action(x, G.matrices[g]))
    for a in range(0, G.order, 5):
        for b in range(G.order):
            assert torch.equal(G.kernel_action(moved[b], a), moved[G.mul[a, b]])
    if k > 1:  # a faithful action: every element moves a generic kernel differently
        assert len({m.numpy().tobytes() for m in moved}) == G.order
    flat = torch.randn(4, 5)
    assert all(torch.equal(G.kernel_action(flat, g), flat) for g in range(G.order))


def test_kernel_action_on_named_grid_moves():
    """Which rot90 / flip of the voxel grid each element is: x runs along the last dim, y against the
    middle one, z against the first (escnn's R3Conv grid)."""
    O, Oh = octahedral(), full_octahedral()
    x = torch.randn(1, 1, 3, 3, 3, dtype=torch.float64)

    def element(G, moved):
        hits = [g for g in range(G.order) if torch.equal(G.kernel_action(x, g), moved)]
        assert len(hits) == 1
        return G.matrices[hits[0]]

    # rot90 in the (y, x) dims turns x into y (a quarter turn about z), in the (z, x) dims x into z
    # (about y), in the (z, y) dims y into -z (about x)
    assert (element(O, torch.rot90(x, 1, dims=(-2, -1))) == [[0, -1, 0], [1, 0, 0], [0, 0, 1]]).all()
    assert (element(O, torch.rot90(x, 1, dims=(-3, -1))) == [[0, 0, -1], [0, 1, 0], [1, 0, 0]]).all()
    assert (element(O, torch.rot90(x, 1, dims=(-3, -2))) == [[1, 0, 0], [0, 0, 1], [0, -1, 0]]).all()
    assert (element(Oh, x.flip(-1)) == np.diag([-1, 1, 1])).all()
    assert (element(Oh, x.flip(-2)) == np.diag([1, -1, 1])).all()
    assert (element(Oh, x.flip(-3)) == np.diag([1, 1, -1])).all()
    assert (element(Oh, x.flip(-1, -2, -3)) == -np.eye(3)).all()


# --- what P(W) means for conv3d ----------------------------------------------------------------------

def _grid_moves(name):
    """(label, move) for moves of a voxel grid written with torch.rot90 / flip alone, and the element of
    ``name`` each is, found by its effect on a generic kernel.  They generate the group."""
    G = pk.get_group(name)
    quarter = [(f"rot90{d}", lambda v, d=d: torch.rot90(v, 1, dims=d)) for d in [(-2, -1), (-3, -1), (-3, -2)]]
    if name == "T":
        # T holds no quarter turn: the half turns, and the 120-degree turn about the body diagonal, the
        # cyclic shift of the three grid axes with two flips
        moves = [(f"rot180{d}", lambda v, d=d: torch.rot90(v, 2, dims=d)) for d in [(-2, -1), (-3, -1)]]
        moves.append(("diagonal", lambda v: torch.rot90(torch.rot90(v, 1, dims=(-3, -1)), 1, dims=(-3, -2))))
    else:
        moves = quarter
    if name == "Oh":
        moves += [("flip-1", lambda v: v.flip(-1)), ("flip-3", lambda v: v.flip(-3))]
    probe = torch.randn(1, 1, 3, 3, 3, dtype=torch.float64)
    out = []
    for label, move in moves:
        hits = [g for g in range(G.order) if torch.equal(G.kernel_action(probe, g), move(probe))]
        assert len(hits) == 1, f"{label} is not one element of {name}"
        out.append((label, move, hits[0]))
    # the moves generate G: so the checks below cover every element's action
    reached, frontier = {G.identity}, [G.identity]
    while frontier:
        frontier = [int(G.mul[g, h]) for g in frontier for _, _, h in out if int(G.mul[g, h]) not in reached]
        reached.update(frontier)
    assert len(reached) == G.order
    return out


def _act_on_channels(x, G, rep, g):
    """rho(g) on dim 1: a regular field's component a becomes component g a (rho(g) e_a = e_{g a})."""
    if rep == "trivial":
        return x
    n = G.order
    src = torch.as_tensor(G.mul[G.inverse[g]], dtype=torch.int64)          # (rho(g) v)_a = v_{g^-1 a}
    index = (torch.arange(x.shape[1] // n)[:, None] * n + src[None, :]).reshape(-1)
    return x.index_select(1, index)


@pytest.mark.parametrize("name,in_rep,out_rep", [("O", "regular", "regular"), ("O", "trivial", "regular"),
                                                 ("Oh", "trivial", "regular"), ("Oh", "regular", "trivial"),
                                                 ("T", "regular", "regular"), ("T", "trivial", "trivial")])
def test_projected_conv3d_commutes_with_the_group(name, in_rep, out_rep):
    G = pk.get_group(name)
    size = {"trivial": 1, "regular": G.order}
    c_in, c_out = (2 if in_rep == "trivial" else 1), (3 if out_rep == "trivial" else 1)
    w = seeded_weight((name, (c_out * size[out_rep], c_in * size[in_rep], 3, 3, 3), in_rep, out_rep))
    pw = pk.project(w, name, in_rep, out_rep)
    assert float(pk.projected_penalty(pw, name, in_rep, out_rep)) <= 1e-24 * float(w.square().sum())
    x = torch.randn(2, w.shape[1], 5, 5, 5, dtype=torch.float64)

    def error(weight, move, g):
        y = F.conv3d(x, weight, padding=1)
        y_of_moved = F.conv3d(_act_on_channels(move(x), G, in_rep, g), weight, padding=1)
        return float((y_of_moved - _act_on_channels(move(y), G, out_rep, g)).norm() / y.norm())

    for label, move, g in _grid_moves(name):
        assert error(pw, move, g) < 1e-12, f"P(W) does not commute with {label}"
        assert error(w, move, g) > 1e-2, f"a random W commutes with {label}"
        # the channel permutation is part of it: the grid move alone does not commute (regular fields)
        if in_rep == out_rep == "regular":
            y = F.conv3d(x, pw, padding=1)
            assert float((F.conv3d(move(x), pw, padding=1) - move(y)).norm() / y.norm()) > 1e-2, label


def test_weights_with_the_wrong_kernel_dims_are_refused():
    with pytest.raises(ValueError, match=r"^group: C4 acts on 1-D and 2-D kernels; weight has shape \(4, 4, 3, 3, 3\)"):
        pk.projected_penalty(torch.randn(4, 4, 3, 3, 3), "C4")
    with pytest.raises(ValueError, match=r"^group: O acts on 3-D kernels .* a 3x3 Conv2d kernel"):
        pk.project(torch.randn(24, 24, 3, 3), "O", "regular", "regular")
    with pytest.raises(ValueError, match=r"^group: T acts on 3-D kernels .* a 3 Conv1d kernel"):
        pk.spectrum(torch.randn(4, 4, 3), "T")
    with pytest.raises(ValueError, match=r"^weight: Oh permutes the kernel's axes, so the kernel must be a cube"):
        pk.projected_penalty(torch.randn(4, 4, 3, 3, 1), "Oh")
    with pytest.raises(ValueError, match=r"^weight: dim 0 .* regular field size 48 of Oh"):
        pk.projected_penalty(torch.randn(24, 1, 3, 3, 3), "Oh", "trivial", "regular")
    with pytest.raises(ValueError, match=r"^weight: expected shape .*Conv3d"):
        pk.projected_penalty(torch.randn(2, 2, 2, 2, 2, 2), "O")
    with pytest.raises(ValueError, match=r"items\[1\]: group: O acts on 3-D kernels"):
        pk.multi_penalty([(torch.randn(2, 2, 3, 3, 3), "O", "trivial", "trivial"),
                          (torch.randn(2, 2, 3, 3), "O", "trivial", "trivial")])
    # kernel-free weights (Linear, 1x1, 1x1x1) suit every group
    for shape in [(24, 3), (24, 3, 1, 1), (24, 3, 1, 1, 1)]:
        assert pk.projected_penalty(torch.randn(shape), "O", "trivial", "regular") > 0
    assert pk.projected_penalty(torch.randn(8, 3, 1, 1, 1), "D4", "trivial", "regular") > 0


# --- the model API ----------------------------------------------------------------------------------

def _cnn3d(order, fields=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, fields * order, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(fields * order, fields * order, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(fields * order, 2, 3, padding=1)).double()


@pytest.mark.parametrize("name", ["O", "T"])
def test_regular_gcnn_3d_after_project_is_invariant(name):
    """attach_regular_gcnn on Conv3d layers; after project_ the network (ReLU between, regular fields
    in the middle, trivial head) is invariant to the group acting on the input volume."""
    G = pk.get_group(name)
    model = _cnn3d(G.order)
    syms = pk.attach_regular_gcnn(model, name, last_out="trivial")
    assert syms == {"0": pk.Symmetry(name, "trivial", "regular"), "2": pk.Symmetry(name, "regular", "regular"),
                    "4": pk.Symmetry(name, "regular", "trivial")}
    per_layer = sum(pk.projected_penalty(m.weight, name, s.in_rep, s.out_rep) for _, m, s in pk.attached_layers(model))
    fields = [m.bias.detach().view(-1, G.order) for _, m, s in pk.attached_layers(model) if s.out_rep == "regular"]
    bias = sum(float((b - b.mean(1, keepdim=True)).square().sum()) for b in fields)
    torch.testing.assert_close(pk.model_penalty(model), per_layer + bias, rtol=1e-12, atol=0)
    report = pk.equivariance_report(model)
    assert [r["type"] for r in report] == ["Conv3d"] * 3 and all(r["relative"] > 0.1 for r in report)
    assert set(report[1]["spectrum"]) == set(G.irrep_names)
    x = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
    moves = _grid_moves(name)
    with torch.no_grad():
        before = max(float((model(m(x)) - m(model(x))).abs().max()) for _, m, _ in moves)
        pk.project_(model)
        assert float(pk.model_penalty(model)) <= 1e-20
        assert all(r["relative"] < 1e-12 for r in pk.equivariance_report(model))
        y = model(x)
        after = max(float((model(m(x)) - m(y)).abs().max()) for _, m, _ in moves)
    assert after < 1e-12 * float(y.abs().max()) and before > 1e-3


def test_attach_symmetry_on_conv3d():
    conv = nn.Conv3d(2, 48, 3)
    assert pk.attach_symmetry(conv, "Oh", "trivial", "regular") == pk.Symmetry("Oh", "trivial", "regular")
    with pytest.raises(ValueError, match=r"^layer \(Conv3d 48x2x3x3x3\): group: C4 acts on 1-D and 2-D kernels"):
        pk.attach_symmetry(nn.Conv3d(2, 48, 3), "C4", "trivial", "regular")
    with pytest.raises(ValueError, match=r"^layer 'c' \(Conv2d 24x2x3x3\): group: O acts on 3-D kernels"):
        pk.attach_symmetry(nn.Conv2d(2, 24, 3), "O", "trivial", "regular", name="c")
    with pytest.raises(ValueError, match="grouped"):
        pk.attach_symmetry(nn.Conv3d(24, 24, 3, groups=2), "O", "regular", "regular")
    with pytest.raises(ValueError, match=r"^layer '0' \(Conv3d 24x1x3x5x5\): weight: O permutes the kernel's axes"):
        pk.attach_regular_gcnn(nn.Sequential(nn.Conv3d(1, 24, (3, 5, 5))), "O")


# --- the reference module's own routes, and the decay ----------------------------------------------------

@pytest.mark.parametrize("case", [("O", (24, 2, 3, 3, 3), "trivial", "regular"), ("Oh", (2, 48, 2, 2, 2), "regular", "trivial"),
                                  ("T", (12, 12, 3, 3, 3), "regular", "regular"), ("T", (2, 3, 4, 4, 4), "trivial", "trivial")],
                         ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_brute_force_and_orbit_forms_agree(case):
    from projkernels.backends import reference as R
    from cases import Oracle

    group, shape, ir, orr = case
    w = seeded_weight(case)
    o = Oracle(w, group, ir, orr)
    torch.testing.assert_close(R.brute_force_project(w, group, ir, orr), o.p, rtol=1e-13, atol=1e-14)
    table = pk.orbit_table(w, group, ir, orr)
    torch.testing.assert_close(R.project(w, table), o.p, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(R.spectrum(w, table), o.spectrum, rtol=1e-10, atol=1e-12 * float(o.w.square().sum()))


def test_equivariance_decay_on_conv3d():
    """The decoupled decay step on a Conv3d layer under Oh: W <- W - lr 2 lambda (W - P W)."""
    conv = nn.Conv3d(2, 48, 3, bias=False).double()
    pk.attach_symmetry(conv, "Oh", "trivial", "regular")
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    handle = pk.equivariance_decay(opt, conv, lambda_perp=0.5)
    w0 = conv.weight.detach().clone()
    conv.weight.grad = torch.zeros_like(w0)
    opt.step()
    expected = w0 - 0.1 * 2 * 0.5 * (w0 - pk.project(w0, "Oh", "trivial", "regular"))
    torch.testing.assert_close(conv.weight.detach(), expected, rtol=1e-12, atol=1e-14)
    handle.remove()


def test_model_penalty_of_a_conv3d_model_under_torch_compile():
    """fullgraph compile of model_penalty (the traced route looks the group up for the bias fields)."""
    model = _cnn3d(pk.get_group("T").order, fields=1)
    pk.attach_regular_gcnn(model, "T", last_out="trivial")
    compiled = torch.compile(lambda: pk.model_penalty(model, lambda_perp=1.0, lambda_G=0.5), fullgraph=True)
    got = compiled()
    expected = pk.model_penalty(model, lambda_perp=1.0, lambda_G=0.5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    params = [m.weight for _, m, _ in pk.attached_layers(model)]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
