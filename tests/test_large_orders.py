"""Large group orders: what the first call builds, and values against a brute-force group average.

The penalty, the energy, the projection and their gradients read only the orbit table; the isotypic
basis serves the spectrum alone and is built on the first spectrum call.  Orbit tables are built in
memory proportional to their size, and orders far above the compiled kernels' unrolled ones (C128,
D64) give the values of the definition P(W) = (1/|G|) sum_g Pi_g(W), computed here by an explicit loop
over the group that shares nothing with the orbit machinery.
"""
import tracemalloc

import numpy as np
import pytest
import torch

import projkernels as pk
from projkernels import orbits
from projkernels.dispatch import config
from projkernels.groups import FiniteGroup, cyclic, dihedral

BACKENDS = [b for b in pk.available_backends("cpu")]


def _no_basis(monkeypatch):
    """Make any read of a group's isotypic basis fail (a class property wins over the cached value)."""
    def fail(self):
        raise AssertionError(f"the isotypic basis of {self.name} was built or read")
    monkeypatch.setattr(FiniteGroup, "isotypic_basis", property(fail))


# Shapes used nowhere else, so that no earlier test has built their tables or configurations.
FRESH = [((8 * 3, 8 * 5), "C8", "regular", "regular"), ((8 * 2, 8 * 3, 3, 3), "D4", "regular", "regular"),
         ((12 * 7, 3), "D6", "trivial", "regular"), ((5, 7, 3, 3), "C4", "trivial", "trivial")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_path_does_not_build_the_isotypic_basis(monkeypatch, backend):
    config.clear_configs()
    _no_basis(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    for shape, group, ir, orr in FRESH:
        w = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        pen, eq = pk.penalty_and_energy(w, group, ir, orr, backend=backend)
        (grad,) = torch.autograd.grad(pen + 0.5 * eq, [w])
        p = pk.project(w.detach(), group, ir, orr, backend=backend)
        torch.testing.assert_close(grad, 2 * (w.detach() - p) + p)  # d(pen + eq/2) = 2(W - PW) + PW
        total = pk.multi_penalty([(w, group, ir, orr), (2 * w, group, ir, orr)], backend=backend)[0]
        torch.testing.assert_close(total, 5 * pen)
    monkeypatch.undo()
    # The spectrum builds it on its first call, and agrees with the training calls made before.
    for shape, group, ir, orr in FRESH:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        pen, eq = pk.penalty_and_energy(w, group, ir, orr, backend=backend)
        spec = pk.spectrum(w, group, ir, orr, backend=backend)
        torch.testing.assert_close(spec[0], eq)
        torch.testing.assert_close(spec[1:].sum(), pen)
        assert torch.isfinite(spec).all() and (spec >= 0).all()


def test_training_tables_hold_no_basis():
    t = orbits.orbit_table((64 * 2, 64 * 3), "C64", "regular", "regular")
    d = t.device_tables("cpu", torch.float32, spectrum=False)
    full = t.device_tables("cpu", torch.float32)
    assert d.basis.shape == (64, 64) and d.basis.stride() == (0, 0) and torch.isnan(d.basis).all()
    assert d.offsets is full.offsets and d.inv_stab is full.inv_stab  # one upload, shared
    np.testing.assert_array_equal(full.basis.numpy(), t.group.isotypic_basis[0])


def test_orbit_table_memory_is_proportional_to_the_table():
    # C128 regular fields on a (128 x 256) Linear: a block of 128 x 128 entries, 128 orbits of 128.
    # Listing the whole action ([|G|, block] indices) would take 16 MiB; the table itself 128 KiB.
    group = cyclic(128)
    group.mul, group.inverse  # the group's own [|G|, |G|] tables are not the orbit table's cost
    orbits._cached_table.cache_clear()
    tracemalloc.start()
    try:
        t = orbits.orbit_table((128, 256), "C128", "regular", "regular")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert t.offsets.shape == (128, 128)
    assert peak < 16 * t.offsets.numel() * 8, f"peak {peak} bytes for a {t.offsets.numel() * 8}-byte table"


# --- values at large orders against the definition ------------------------------------------------------

def _channel_perm(group, rep, fields):
    """perm[g]: Pi_g moves channel c to perm[g][c] (rho(g) e_h = e_{gh} inside each field)."""
    n = group.order
    if rep == "trivial":
        return np.tile(np.arange(fields), (n, 1))
    per_field = np.asarray(group.mul)  # [g, h] -> g h
    return (np.arange(fields)[None, :, None] * n + per_field[:, None, :]).reshape(n, fields * n)


def _copies(w, group, in_rep, out_rep):
    """[|G|, out, in]: Pi_g(W) for every g, by an explicit loop (Linear weights)."""
    n = group.order
    fo = w.shape[0] // (n if out_rep == "regular" else 1)
    fi = w.shape[1] // (n if in_rep == "regular" else 1)
    po, pi = _channel_perm(group, out_rep, fo), _channel_perm(group, in_rep, fi)
    out = torch.empty((n,) + tuple(w.shape), dtype=w.dtype)
    for g in range(n):
        moved = torch.empty_like(w)
        moved[np.ix_(po[g], pi[g])] = w  # Pi_g(W)[g a, g b] = W[a, b]
        out[g] = moved
    return out


LARGE = [(cyclic(128), (128, 256), "regular", "regular"), (dihedral(64), (128, 128), "regular", "regular"),
         (cyclic(128), (256, 3), "trivial", "regular"), (dihedral(64), (2, 256), "regular", "trivial")]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("case", LARGE, ids=lambda c: f"{c[0].name}-{c[1]}-{c[2]}-{c[3]}")
def test_large_orders_match_the_group_average(case, backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend} is not available here")
    group, shape, ir, orr = case
    w = torch.randn(shape, generator=torch.Generator().manual_seed(group.order), dtype=torch.float64)
    copies = _copies(w, group, ir, orr)
    avg = copies.mean(dim=0)
    pen, eq = pk.penalty_and_energy(w, group.name, ir, orr, backend=backend)
    torch.testing.assert_close(pk.project(w, group.name, ir, orr, backend=backend), avg)
    torch.testing.assert_close(pen, (w - avg).square().sum())
    torch.testing.assert_close(eq, avg.square().sum())
    # Isotypic energies from the character projections P_k = (d_k / (|G| <chi_k, chi_k>)) sum_g chi_k(g) Pi_g.
    chars = torch.as_tensor(group.characters, dtype=torch.float64)
    coef = torch.tensor([d / float(c @ c) for d, c in zip(group.irrep_dims, chars)], dtype=torch.float64)
    proj = (coef[:, None] * chars) @ copies.reshape(group.order, -1)
    expect = proj.square().sum(dim=1)
    torch.testing.assert_close(pk.spectrum(w, group.name, ir, orr, backend=backend), expect)


@pytest.mark.parametrize("group", [cyclic(n) for n in (1, 2, 3, 6, 7, 12)] + [dihedral(n) for n in (1, 2, 3, 6, 7)],
                         ids=str)
def test_closed_form_basis_spans_the_isotypic_components(group):
    # Each row of the closed-form basis is fixed by its irrep's projector (built from the characters and
    # the multiplication table), so it lies in that isotypic component.
    basis, owner = group.isotypic_basis
    n = group.order
    gx = np.asarray(group.mul)[:, group.inverse]       # g x^-1
    for k, chi in enumerate(group.characters):
        P = group.irrep_dims[k] / (n * float(chi @ chi) / n) * chi[gx]
        rows = basis[owner == k]
        np.testing.assert_allclose(rows @ P.T, rows, atol=1e-12)
        assert len(rows) == round(np.trace(P))


def test_a_multiplication_table_that_is_not_a_group_law_is_refused():
    # A Latin square with an identity that is not associative (the smallest such loop has order 5):
    # its regular "representation" is not one, and the orbit table must say so.
    mul = np.array([[0, 1, 2, 3, 4], [1, 0, 3, 4, 2], [2, 4, 0, 1, 3], [3, 2, 4, 0, 1], [4, 3, 1, 2, 0]])
    assert any(mul[mul[a, b], c] != mul[a, mul[b, c]] for a in range(5) for b in range(5) for c in range(5))
    loop = FiniteGroup("loop5", tuple((0, j) for j in range(5)), mul, ("irrep_0",), (1,), np.ones((1, 5)), 5,
                       False, lambda kernel, element, n: kernel)
    with pytest.raises(AssertionError, match="not a group law|not a group action"):
        orbits.orbit_table((5, 5), loop, "regular", "regular")
