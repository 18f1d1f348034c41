"""Cross-check with escnn: weights that R2Conv and R3Conv expand from their equivariant bases have
penalty 0, and the cube groups' tables are escnn's element by element."""
import functools
import os

import pytest
import torch

import projkernels as pk

if os.environ.get("PROJKERNELS_REQUIRE_ESCNN") == "1":
    import escnn  # noqa: F401  (CI sets the variable: there these checks must run, not skip)
else:
    escnn = pytest.importorskip("escnn", reason="escnn is an optional test dependency (pip install '.[escnn]')")
import numpy as np  # noqa: E402
from escnn import gspaces, nn as enn  # noqa: E402

GSPACES = {"C4": lambda: gspaces.rot2dOnR2(4), "D4": lambda: gspaces.flipRot2dOnR2(4),
           "D1": lambda: gspaces.flip2dOnR2()}


def _expanded_weight(group, in_rep, out_rep, kernel_size, c_in=2, c_out=3, seed=0):
    gs = GSPACES[group]()
    rep = {"regular": gs.regular_repr, "trivial": gs.trivial_repr}
    conv = enn.R2Conv(enn.FieldType(gs, c_in * [rep[in_rep]]), enn.FieldType(gs, c_out * [rep[out_rep]]),
                      kernel_size=kernel_size, bias=False).to(torch.float64)
    # float64 like tests/test_escnn_interop.py: escnn shares sampled bases between modules, so a module
    # converted there would make a float32 expansion here fail with a dtype mismatch in either order.
    torch.manual_seed(seed)
    torch.nn.init.normal_(conv.weights)
    return conv.expand_parameters()[0].detach()


@pytest.mark.parametrize("group", sorted(GSPACES))
@pytest.mark.parametrize("in_rep", ["trivial", "regular"])
@pytest.mark.parametrize("out_rep", ["trivial", "regular"])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_escnn_weights_have_zero_penalty(group, in_rep, out_rep, kernel_size):
    w = _expanded_weight(group, in_rep, out_rep, kernel_size)
    assert w.abs().max() > 0
    kw = dict(group=group, in_rep=in_rep, out_rep=out_rep)
    for backend in pk.available_backends("cpu"):
        penalty, eq = pk.penalty_and_energy(w, **kw, backend=backend)
        assert penalty / (penalty + eq) <= 1e-10, backend
    # and a perturbed copy is clearly penalised, so the check above can fail
    noisy = w + 0.1 * w.abs().max() * torch.randn_like(w)
    assert pk.projected_penalty(noisy, **kw) / noisy.square().sum() > 1e-4


def test_escnn_irrep_order_and_characters():
    from escnn.group import dihedral_group, cyclic_group
    import numpy as np
    for n in (1, 2, 3, 4, 6):
        G = dihedral_group(n)
        ours = pk.get_group(f"D{n}")
        assert tuple(ir.name for ir in G.irreps()) == ours.irrep_names
        elements = list(G.elements)
        assert [str(e) for e in elements] == [str(G.element((f, j))) for f, j in ours.elements]
        for chi, ir in zip(ours.characters, G.irreps()):
            assert np.allclose(chi, [np.trace(ir(e)) for e in elements])
    assert len(cyclic_group(6).irreps()) == len(pk.irrep_names("C6"))


# --- the cube groups: octaOnR3() is "O", fullOctaOnR3() is "Oh", T is O's first 12 elements ----------

R3_GSPACES = {"O": lambda: gspaces.octaOnR3(), "Oh": lambda: gspaces.fullOctaOnR3()}


@functools.lru_cache(maxsize=None)
def _r3_gspace(group):
    return R3_GSPACES[group]()


@pytest.mark.parametrize("group", sorted(R3_GSPACES))
def test_escnn_cube_group_tables(group):
    """Element order, the action on R^3, the law, the regular representation, the identity and the
    irreps (names, sizes, characters) are escnn's, element by element."""
    gs = _r3_gspace(group)
    G, ours = gs.fibergroup, pk.get_group(group)
    elements = list(G.elements)
    assert len(elements) == ours.order
    mats = np.stack([gs.basespace_action(e) for e in elements])
    np.testing.assert_allclose(mats, ours.matrices, atol=1e-9)
    index = {i: [j for j, h in enumerate(elements) if h == e] for i, e in enumerate(elements)}
    assert all(v == [i] for i, v in index.items())
    for a in range(ours.order):
        for b in range(ours.order):
            assert elements[a] @ elements[b] == elements[int(ours.mul[a, b])]
    # escnn's regular representation: rho(g) e_h = e_{g h}, the channel layout of its regular fields
    for g in range(ours.order):
        rho = np.zeros((ours.order, ours.order))
        rho[ours.mul[g], np.arange(ours.order)] = 1
        np.testing.assert_allclose(G.regular_representation(elements[g]), rho, atol=1e-9)
    assert elements[ours.identity] == G.identity
    assert tuple(ir.name for ir in G.irreps()) == ours.irrep_names == pk.irrep_names(group)
    assert tuple(ir.size for ir in G.irreps()) == ours.irrep_dims
    for chi, ir in zip(ours.characters, G.irreps()):
        np.testing.assert_allclose(chi, [np.trace(ir(e)) for e in elements], atol=1e-9)


def test_tetrahedral_group_is_escnns_octahedral_subgroup():
    """T is the first 12 elements of octaOnR3()'s group (escnn lists the tetrahedron's rotations first),
    closed under escnn's law, with the law of O restricted."""
    gs = _r3_gspace("O")
    elements = list(gs.fibergroup.elements)[:12]
    T, O = pk.get_group("T"), pk.get_group("O")
    np.testing.assert_allclose(np.stack([gs.basespace_action(e) for e in elements]), T.matrices, atol=1e-9)
    for a in range(12):
        for b in range(12):
            assert elements[a] @ elements[b] == elements[int(T.mul[a, b])]
    assert (T.mul == O.mul[:12, :12]).all()


@functools.lru_cache(maxsize=None)
def _expanded_r3_weight(group, in_rep, out_rep, seed=0):
    gs = _r3_gspace(group)
    rep = {"regular": gs.regular_repr, "trivial": gs.trivial_repr}
    # One field per side where both are regular (escnn's basis for those is the slow one), else 2 out.
    c_out = 1 if in_rep == out_rep == "regular" else 2
    conv = enn.R3Conv(enn.FieldType(gs, [rep[in_rep]]), enn.FieldType(gs, c_out * [rep[out_rep]]),
                      kernel_size=3, bias=False).to(torch.float64)
    torch.manual_seed(seed)
    torch.nn.init.normal_(conv.weights)
    return conv.expand_parameters()[0].detach()


@pytest.mark.parametrize("group", sorted(R3_GSPACES))
@pytest.mark.parametrize("in_rep", ["trivial", "regular"])
@pytest.mark.parametrize("out_rep", ["trivial", "regular"])
def test_escnn_r3conv_weights_have_zero_penalty(group, in_rep, out_rep):
    w = _expanded_r3_weight(group, in_rep, out_rep)
    assert w.dim() == 5 and w.shape[2:] == (3, 3, 3) and w.abs().max() > 0
    kw = dict(group=group, in_rep=in_rep, out_rep=out_rep)
    for backend in pk.available_backends("cpu"):
        penalty, eq = pk.penalty_and_energy(w, **kw, backend=backend)
        assert penalty / (penalty + eq) <= 1e-10, backend
    # the same through the multi-tensor op, next to a 2-D layer
    w2 = _expanded_weight("C4", "regular", "regular", 3)
    _, _, per_layer, eq = pk.multi_penalty([(w, group, in_rep, out_rep), (w2, "C4", "regular", "regular")])
    assert per_layer[0] / eq[0] <= 1e-10
    # and a perturbed copy is clearly penalised, so the check above can fail
    noisy = w + 0.1 * w.abs().max() * torch.randn_like(w)
    assert pk.projected_penalty(noisy, **kw) / noisy.square().sum() > 1e-4
    # an O-equivariant weight is T-equivariant too (T is a subgroup of O)
    if group == "O" and in_rep == out_rep == "trivial":
        assert pk.projected_penalty(w, "T") / w.square().sum() <= 1e-10
