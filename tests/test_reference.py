"""The reference module's own routes: the brute-force projection, the general (isotypic-basis)
spectrum the reference backend uses, and the torch.fft spectrum kept as an independent cross-check.

The reference backend itself is held against the oracle through the public API in
tests/test_conformance.py; this file checks the module's functions that the suite does not reach.
"""
import pytest
import torch

import projkernels as pk
from projkernels.backends import reference as R
from projkernels.orbits import orbit_table

from cases import ALL_CASES, Oracle, c2_x_c4, case_id, seeded_weight


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_basis_spectrum_equals_fft_spectrum(case):
    """The general route equals the C_N / D_N torch.fft route to float64 rounding."""
    group, shape, ir, orr = case
    w = seeded_weight(case)
    table = orbit_table(w, group, ir, orr)
    norm2 = float(w.square().sum())
    spec = R.spectrum(w, table)
    assert spec.shape == (len(pk.irrep_names(group)),) and spec.dtype == torch.float64
    torch.testing.assert_close(spec, R.spectral_spectrum(w, table), rtol=1e-12, atol=1e-13 * norm2)
    assert (spec >= 0).all()


def test_reference_backend_uses_the_general_spectrum():
    # A group that is neither C_N nor D_N: the torch.fft route cannot describe it, the basis route can.
    G = c2_x_c4()
    w = seeded_weight(("C2xC4", (16, 8), "regular", "regular"))
    o = Oracle(w, G, "regular", "regular")
    spec = pk.spectrum(w, G, "regular", "regular", backend="reference")
    assert spec.shape == (len(G.irrep_names),)
    torch.testing.assert_close(spec, o.spectrum, rtol=1e-12, atol=1e-12 * float(o.w.square().sum()))


@pytest.mark.parametrize("case", ALL_CASES[::11], ids=case_id)
def test_brute_force_project_equals_oracle(case):
    # Two independently written dense group averages.
    group, shape, ir, orr = case
    w = seeded_weight(case)
    torch.testing.assert_close(R.brute_force_project(w, group, ir, orr), Oracle(w, group, ir, orr).p,
                               rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_half_types_accumulate_in_float32(dtype):
    case = ("D4", (16, 8, 3, 3), "regular", "regular")
    w = seeded_weight(case, dtype)
    table = orbit_table(w, *case[:1], *case[2:])
    penalty, energy = R.forward(w, table)
    assert penalty.dtype == energy.dtype == R.spectrum(w, table).dtype == R.project(w, table).dtype == torch.float32
    o = Oracle(w.double(), "D4", "regular", "regular")
    torch.testing.assert_close(penalty.double(), o.penalty, rtol=1e-5, atol=0)
    torch.testing.assert_close(R.spectrum(w, table).double(), o.spectrum, rtol=1e-5, atol=1e-6 * float(o.energy))


def test_brute_force_is_not_trivially_identity():
    # A random weight is not equivariant, so the comparisons above compare something non-trivial.
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    p = R.brute_force_project(w, "C4", "regular", "regular")
    assert (w - p).abs().max() > 0.1
