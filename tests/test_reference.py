"""The reference routes against each other: brute force vs orbit form vs spectral form (SPEC 3, 4)."""
import zlib

import pytest
import torch

import projkernels as pk
from projkernels import reference as R
from projkernels.orbits import orbit_table

from cases import ALL_CASES, case_id


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_routes_agree(case):
    group, shape, ir, orr = case
    torch.manual_seed(zlib.crc32(case_id(case).encode()))
    w = torch.randn(shape, dtype=torch.float64)
    table = orbit_table(w, group, ir, orr)
    p_brute = R.brute_force_project(w, group, ir, orr)
    norm2 = w.square().sum()

    penalty, eq = R.forward(w, table)
    torch.testing.assert_close(penalty, (w - p_brute).square().sum(), rtol=1e-12, atol=1e-12 * norm2)
    torch.testing.assert_close(eq, p_brute.square().sum(), rtol=1e-12, atol=1e-12 * norm2)
    torch.testing.assert_close(R.project(w, table), p_brute, rtol=1e-12, atol=1e-13)

    spec = R.spectral_spectrum(w, table)
    assert spec.shape == (len(pk.irrep_names(group)),)
    torch.testing.assert_close(spec, R.basis_spectrum(w, table), rtol=1e-10, atol=1e-12 * norm2)
    torch.testing.assert_close(spec.sum(), norm2, rtol=1e-12, atol=0)
    torch.testing.assert_close(spec[0], eq, rtol=1e-12, atol=1e-12 * norm2)
    torch.testing.assert_close(spec[1:].sum(), penalty, rtol=1e-10, atol=1e-12 * norm2)
    assert (spec >= 0).all()


@pytest.mark.parametrize("case", ALL_CASES[::7], ids=case_id)
def test_isotypic_energies_match_character_projectors(case):
    """E_rho = ||P_rho W||^2 with P_rho = (dim/|G|) sum_g chi(g) Pi_g, applied to W as written."""
    group, shape, ir, orr = case
    G = pk.get_group(group)
    w = torch.randn(shape, dtype=torch.float64)
    spec = R.spectral_spectrum(w, orbit_table(w, group, ir, orr))
    # Pi_g W through the brute-force machinery: project a weight with one group element at a time.
    copies = torch.stack([_apply(w, G, g, ir, orr) for g in range(G.order)])
    for k, chi in enumerate(G.characters):
        m = float((chi * chi).sum()) / G.order  # 2 for the complex-type real irreps of C_N
        p_rho = G.irrep_dims[k] / (G.order * m) * torch.einsum("g,g...->...", torch.as_tensor(chi), copies)
        torch.testing.assert_close(spec[k], p_rho.square().sum(), rtol=1e-10, atol=1e-10)


def _apply(w, G, g, in_rep, out_rep):
    from projkernels.reference import _dense_rep
    from projkernels.orbits import field_size
    r_out = _dense_rep(G, out_rep, g, w.shape[0] // field_size(out_rep, G), w.dtype)
    r_in = _dense_rep(G, in_rep, g, w.shape[1] // field_size(in_rep, G), w.dtype)
    return torch.einsum("oa,ab...,ib->oi...", r_out, G.kernel_action(w, g), r_in)


def test_brute_force_is_not_trivially_identity():
    # A random weight is not equivariant, so the routes above compare something non-trivial.
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    p = R.brute_force_project(w, "C4", "regular", "regular")
    assert (w - p).abs().max() > 0.1
