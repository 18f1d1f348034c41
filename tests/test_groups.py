"""The group model of SPEC section 2: tables, law, irreps, kernel action."""
import numpy as np
import pytest
import torch

import projkernels as pk
from projkernels.groups import cyclic, dihedral


@pytest.mark.parametrize("n", range(1, 9))
def test_dihedral_law_and_order(n):
    G = dihedral(n)
    assert G.elements == tuple((f, j) for f in (0, 1) for j in range(n))
    for a, (f1, j1) in enumerate(G.elements):
        for b, (f2, j2) in enumerate(G.elements):
            assert G.elements[G.mul[a, b]] == (f1 ^ f2, (j1 + (-1) ** f1 * j2) % n)
    # associativity and inverses
    m = G.mul
    for a in range(2 * n):
        for b in range(2 * n):
            assert (m[m[a, b]] == m[a][m[b]]).all()
        assert m[a, G.inverse[a]] == 0


@pytest.mark.parametrize("group", [cyclic(n) for n in range(1, 9)] + [dihedral(n) for n in range(1, 9)], ids=str)
def test_irreps_are_orthonormal_and_complete(group):
    chars = group.characters
    gram = chars @ chars.T / group.order
    # real type: <chi, chi> = 1; complex type (C_N, 0 < k < N/2): 2; distinct irreps orthogonal
    assert np.allclose(gram, np.diag(np.diag(gram)))
    assert set(np.round(np.diag(gram), 9)) <= {1.0, 2.0}
    basis, owner = group.isotypic_basis
    assert np.allclose(basis @ basis.T, np.eye(group.order))
    assert np.allclose(basis[0], 1 / np.sqrt(group.order))
    # the regular rep holds each irrep dim times (complex-type real irreps: dim/2 times each)
    counts = np.bincount(owner, minlength=len(chars))
    dims = np.array(group.irrep_dims)
    assert (counts == dims * dims / np.diag(np.round(gram))).all()
    assert len(pk.irrep_names(group)) == len(chars)


def test_irrep_names():
    assert pk.irrep_names("C4") == ("0", "1", "2")
    assert pk.irrep_names("C5") == ("0", "1", "2")
    assert pk.irrep_names("D4") == ("irrep_0,0", "irrep_1,0", "irrep_1,1", "irrep_1,2", "irrep_0,2")
    assert pk.irrep_names("D3") == ("irrep_0,0", "irrep_1,0", "irrep_1,1")


@pytest.mark.parametrize("name", ["C2", "C4", "D1", "D2", "D4"])
@pytest.mark.parametrize("k", [2, 3])
def test_kernel_action_is_a_group_action(name, k):
    G = pk.get_group(name)
    x = torch.randn(1, 1, k, k)
    for a in range(G.order):
        for b in range(G.order):
            lhs = G.kernel_action(x, int(G.mul[a, b]))
            rhs = G.kernel_action(G.kernel_action(x, b), a)
            assert torch.equal(lhs, rhs)


def test_kernel_action_matches_spec_formula():
    G = pk.get_group("D4")
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    for g, (f, j) in enumerate(G.elements):
        expect = torch.rot90(torch.flip(x, [-1]) if f else x, k=j, dims=(-2, -1))
        assert torch.equal(G.kernel_action(x, g), expect)
    # 1-D: C2's rotation reverses a line, D1's reflection too
    line = torch.arange(4.0).reshape(1, 1, 4)
    assert torch.equal(pk.get_group("C2").kernel_action(line, 1), line.flip(-1))
    assert torch.equal(pk.get_group("D1").kernel_action(line, 1), line.flip(-1))
    assert torch.equal(pk.get_group("D2").kernel_action(line, 3), line)


def test_group_names():
    assert pk.get_group("c4") is pk.get_group("C4")
    with pytest.raises(ValueError, match="unknown group"):
        pk.get_group("SO3")
    with pytest.raises(ValueError, match="N >= 1"):
        pk.get_group("C0")
    with pytest.raises(TypeError, match="group"):
        pk.get_group(4)
