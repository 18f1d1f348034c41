"""The group model (docs/design.md, Conventions): tables, law, irreps, kernel action, names."""
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
    assert pk.get_group("C4") is pk.get_group("C4") and pk.get_group("D12").order == 24
    with pytest.raises(ValueError, match="unknown group"):
        pk.get_group("SO3")
    with pytest.raises(ValueError, match="N >= 1"):
        pk.get_group("C0")
    with pytest.raises(TypeError, match="group"):
        pk.get_group(4)


# Spellings that used to be read as C4 or D8: lower case, spaces, zero padding, a sign, and digits
# that are digits to Unicode but not ASCII (Arabic-Indic four, full-width four, superscript four).
@pytest.mark.parametrize("name", ["c4", "d8", " C4", "C4 ", "C 4", "C04", "C+4", "C\u0664", "C\uff14", "C\u00b2",
                                  "\u0421" + "4", "C4\n", "C", "", "Z4"])
def test_group_names_are_exact(name):
    with pytest.raises(ValueError) as info:
        pk.get_group(name)
    msg = str(info.value)
    assert msg.startswith("group: ") and repr(name) in msg
    assert "'C<N>'" in msg and "'D<N>'" in msg and "ASCII digits" in msg


def test_group_name_errors_name_the_argument():
    w = torch.randn(8, 8, 3, 3)
    with pytest.raises(ValueError, match=r"^group: 'c4' is not a group name"):
        pk.projected_penalty(w, "c4", "regular", "regular")
    with pytest.raises(ValueError, match=r"^items\[1\]: group: 'C04' is not a group name"):
        pk.multi_penalty([(w, "C4", "regular", "regular"), (w, "C04", "regular", "regular")])
    # the canonical spelling still works everywhere
    assert float(pk.projected_penalty(pk.project(w, "C4", "regular", "regular"), "C4", "regular", "regular")) < 1e-10


def _c3_like(name):
    """A user group: C3 built as data under another name (for registration tests)."""
    from dataclasses import replace
    return replace(cyclic(3), name=name)


def test_registered_group_is_found_by_name(monkeypatch):
    import projkernels.groups as groups
    monkeypatch.setattr(groups, "_REGISTERED", {})  # leave no registration behind for other tests
    g = _c3_like("Tri3")
    assert pk.register_group(g) is g
    assert pk.get_group("Tri3") is g
    assert pk.register_group(g) is g  # registering the same object again is harmless
    w = torch.randn(6, 3)
    assert torch.allclose(pk.projected_penalty(w, "Tri3", "regular", "trivial"),
                          pk.projected_penalty(w, "C3", "regular", "trivial"))
    with pytest.raises(ValueError, match="different group is already registered as 'Tri3'"):
        pk.register_group(_c3_like("Tri3"))
    with pytest.raises(ValueError, match="registered now: 'Tri3'"):
        pk.get_group("Tri4")
    # what a reload of projkernels.groups does: the registry starts empty, and the error says why
    monkeypatch.setattr(groups, "_REGISTERED", {})
    with pytest.raises(ValueError) as info:
        pk.get_group("Tri3")
    msg = str(info.value)
    assert msg.startswith("group: unknown group 'Tri3'") and "register_group" in msg
    assert "process-local" in msg and "registered now: none" in msg


def test_registration_does_not_reach_a_new_process():
    import subprocess
    import sys
    code = ("import projkernels as pk\n"
            "try:\n    pk.get_group('Tri3')\nexcept ValueError as e:\n    print(e)\n")
    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    assert "unknown group 'Tri3'" in out.stdout and "process-local" in out.stdout


@pytest.mark.parametrize("name", ["C4", "c4", "D 8", "C04", "C\u0664", " Tri", ""])
def test_register_group_rejects_reserved_and_padded_names(name):
    with pytest.raises(ValueError, match="group: "):
        pk.register_group(_c3_like(name))
    with pytest.raises(TypeError, match="group: expected a FiniteGroup"):
        pk.register_group("C3")
