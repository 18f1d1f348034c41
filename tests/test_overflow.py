"""Weights near the dtype's largest finite value: no overflow where the true result is finite.

The orbit mean is a sum divided by |G|, and the sum of values near the largest finite value
overflows although the mean does not; W - P W overflows for such values of opposite signs.  Every
backend and dtype must give the true result wherever it is finite: an exactly equivariant weight
has penalty 0, P W = W and a zero penalty gradient; P W, small multiples of W - P W (a scaled
gradient, the decay) and the per-irrep energies of a non-equivariant weight are finite where their
true values are.  Quantities whose true value exceeds the range (||W||^2) are inf.  The expected
values are computed in float64 on the weight scaled by 2^-16 (exact), where nothing overflows.
"""
import pytest
import torch

import projkernels as pk
from projkernels.backends import reference as R
from projkernels.decay import apply_decay_, decay_backends
from projkernels.orbits import orbit_table

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BACKENDS = [b for b in ("reference", "cpp", "triton") if b in pk.available_backends("cpu")]
# Two layouts: regular fields (free action, |Stab| = 1) and a trivial-to-trivial 3x3 kernel, whose
# diagonal and centre entries have non-trivial stabilisers (entries listed several times).
CASES = [((8, 8), "C4", "regular", "regular"), ((2, 3, 3, 3), "D4", "trivial", "trivial")]
DOWN, UP = 2.0 ** -16, 2.0 ** 16
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def _ids(case):
    return f"{case[1]}-{case[2]}-{case[3]}"


def _acc_max(dtype):
    return torch.finfo(R.acc_dtype(dtype)).max


def _big(dtype):
    return 0.9 * torch.finfo(dtype).max


def _equivariant(case, dtype, seed=0):
    """An exactly equivariant weight with entries up to 0.9 * max: equal values on each orbit."""
    shape, group, ir, orr = case
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = R.project(w, orbit_table(shape, group, ir, orr))
    p = p / p.abs().max() * _big(dtype)
    p[p.abs() < 0.5 * _big(dtype)] = _big(dtype)  # most orbits huge, of both signs
    return p.to(dtype)


def _non_equivariant(case, dtype, seed=1):
    """Entries of random sign with magnitudes in [0.5, 0.9] * max: orbit sums and W - P W overflow."""
    shape = case[0]
    g = torch.Generator().manual_seed(seed)
    mag = 0.5 + 0.4 * torch.rand(shape, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return (sign * mag * torch.finfo(dtype).max).to(dtype)


def _expected_project(w, case):
    """P W in float64 from the scaled weight (no overflow there), scaled back."""
    return R.project(w.double() * DOWN, orbit_table(*case)) * UP


def _check_values(got, want, dtype, what, atol=0.0):
    """got (in its dtype) against the exact want (float64, possibly beyond the range): equal to
    want rounded where want is inside the range, inf of want's sign where it is well beyond it."""
    assert not bool(got.isnan().any()), f"{what}: NaN in {got}"
    got = got.double()
    fmax = torch.finfo(dtype).max
    inside = want.abs() <= fmax * (1 - 4 * TOL[dtype])
    beyond = want.abs() > fmax * (1 + 4 * TOL[dtype])
    assert torch.isfinite(got[inside]).all(), f"{what}: inf where the true value is finite"
    torch.testing.assert_close(got[inside], want[inside], rtol=TOL[dtype], atol=atol, msg=what)
    assert torch.isinf(got[beyond]).all(), f"{what}: finite where the true value exceeds the range"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_equivariant_weight_near_the_max_has_penalty_zero_and_projects_to_itself(backend, case, dtype):
    w = _equivariant(case, dtype).requires_grad_()
    pen, eq = pk.penalty_and_energy(w, *case[1:], backend=backend)
    assert float(pen.detach()) == 0.0, f"penalty of an exactly equivariant weight: {float(pen.detach())}"
    # ||P W||^2 = ||W||^2: inf where it exceeds the accumulation dtype's range, exact otherwise.
    true_eq = float((w.detach().double() * DOWN).square().sum()) * UP * UP
    if true_eq > _acc_max(dtype):
        assert float(eq) == float("inf")
    else:
        assert float(eq) == pytest.approx(true_eq, rel=1e-6)
    pen.backward()
    assert torch.equal(w.grad, torch.zeros_like(w)), "the penalty's gradient of an equivariant weight is 0"
    p = pk.project(w.detach(), *case[1:], backend=backend)
    assert torch.equal(p, w.detach()), "P W != W for an exactly equivariant weight"
    s = pk.spectrum(w.detach(), *case[1:], backend=backend)
    assert not bool(s.isnan().any()) and bool((s[1:] == 0).all()), f"spectrum {s.tolist()}"
    assert float(s[0]) == float(eq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_weight_near_the_max_has_finite_projection_gradient_and_spectrum(backend, case, dtype):
    w = _non_equivariant(case, dtype)
    want_p = _expected_project(w, case)
    _check_values(pk.project(w, *case[1:], backend=backend), want_p, dtype, "P W",
                  atol=TOL[dtype] * float(w.double().abs().max()))
    # A gradient of 0.25 on the penalty and 0.125 on the energy: 0.5 (W - P W) + 0.25 P W, finite
    # although W - P W is not.
    x = w.clone().requires_grad_()
    pen, eq = pk.penalty_and_energy(x, *case[1:], backend=backend)
    (0.25 * pen + 0.125 * eq).backward()
    want_g = 0.5 * (w.double() - want_p) + 0.25 * want_p
    _check_values(x.grad, want_g, dtype, "gradient", atol=TOL[dtype] * float(w.double().abs().max()))
    # The energies per irrep: no NaN (inf - inf); each is inf exactly where it exceeds the range.
    s = pk.spectrum(w, *case[1:], backend=backend)
    want_s = R.spectrum(w.double() * DOWN, orbit_table(*case)) * UP * UP
    acc = R.acc_dtype(dtype)
    assert not bool(s.isnan().any()), f"spectrum {s.tolist()}"
    # Rounding error relative to the total energy (a small irrep energy is a difference of large values).
    total = float(want_s.sum())
    _check_values(s, want_s, acc, "spectrum", atol=TOL[dtype] * total if total <= _acc_max(dtype) else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp", "triton") if b in decay_backends("cpu")])
def test_the_decay_of_weights_near_the_max(backend, mode, dtype):
    case = CASES[0]
    table = orbit_table(*case)
    eqw, w = _equivariant(case, dtype), _non_equivariant(case, dtype)
    c_dev, c_mean = (-0.2, -0.05) if mode == "decoupled" else (0.2, 0.05)
    for weight in (eqw, w):
        grad = (0.1 * _non_equivariant(case, dtype, seed=5).double()).to(dtype)
        target = weight.clone() if mode == "decoupled" else grad.clone()
        apply_decay_([target], None if mode == "decoupled" else [weight], [table], [c_dev], [c_mean],
                     backend=backend)
        p = _expected_project(weight, case)
        old = (weight if mode == "decoupled" else grad).double()
        want = old + c_dev * (weight.double() - p) + c_mean * p
        # Rounding relative to the terms (an entry can be a difference of values near the max).
        _check_values(target, want, dtype, f"{mode} decay", atol=TOL[dtype] * float(weight.double().abs().max()))
    # An equivariant weight without lambda_G is left exactly as it is.
    t = eqw.clone()
    apply_decay_([t], None, [table], [-0.2], [0.0], backend=backend)
    assert torch.equal(t, eqw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_multi_tensor_penalty_of_weights_near_the_max(backend, dtype):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} is not available")
    a = _equivariant(CASES[0], dtype).requires_grad_()
    b = _non_equivariant(CASES[1], dtype).requires_grad_()
    c = _equivariant(CASES[1], dtype, seed=3).requires_grad_()
    items = [(a, *CASES[0][1:]), (b, *CASES[1][1:]), (c, *CASES[1][1:])]
    pen, eq, per_pen, per_eq = pk.multi_penalty(items, backend=backend)
    assert float(per_pen[0]) == 0.0 and float(per_pen[2]) == 0.0, per_pen.tolist()
    assert not bool(per_pen.isnan().any()) and not bool(per_eq.isnan().any())
    (0.25 * per_pen[1] + 0.125 * per_eq[1] + per_pen[0] + per_pen[2]).backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(c.grad, torch.zeros_like(c))
    want_p = _expected_project(b.detach(), CASES[1])
    _check_values(b.grad, 0.5 * (b.detach().double() - want_p) + 0.25 * want_p, dtype, "multi gradient",
                  atol=TOL[dtype] * float(b.detach().double().abs().max()))


def test_the_emulated_cuda_kernels_near_the_max():
    # The .cu kernels share the per-orbit math of the CPU ops (csrc/include/orbit_math.h, decay_math.h), run
    # here on the emulated device (tests/test_cuda_emulated.py; one small case: each build takes minutes).
    pytest.importorskip("projkernels.backends.native", reason="projkernels._C is not built")
    import test_cuda_emulated as E
    ops = E._finite_lib("chunked")
    case, dtype = CASES[0], torch.float32
    t = orbit_table(*case)
    d = t.device_tables("cpu", dtype)
    eqw = _equivariant(case, dtype)
    pen, eq, spec = ops.fused_forward(eqw, d.offsets, d.inv_stab, d.basis, d.row_irrep, *t.geometry, True)
    assert float(pen) == 0.0 and not bool(spec.isnan().any()) and bool((spec[1:] == 0).all()), spec.tolist()
    p = ops.fused_backward(eqw, d.zero, d.half, d.offsets, d.inv_stab, *t.geometry[1:])
    assert torch.equal(p, eqw), "P W != W for an exactly equivariant weight"
    w = _non_equivariant(case, dtype)
    want_p = _expected_project(w, case)
    atol = TOL[dtype] * float(w.double().abs().max())
    _check_values(ops.fused_backward(w, d.zero, d.half, d.offsets, d.inv_stab, *t.geometry[1:]), want_p, dtype,
                  "emulated P W", atol=atol)
    gp, ge = torch.tensor(0.25), torch.tensor(0.125)
    _check_values(ops.fused_backward(w, gp, ge, d.offsets, d.inv_stab, *t.geometry[1:]),
                  0.5 * (w.double() - want_p) + 0.25 * want_p, dtype, "emulated gradient", atol=atol)
    decay = E.emu.load("decay_kernels.cu")  # its descriptors are kernel arguments: nothing to stage
    target = w.clone()
    decay.multi_decay_([target], [d.offsets], t.geometry[1:], [-0.2], [-0.05])
    _check_values(target, w.double() - 0.2 * (w.double() - want_p) - 0.05 * want_p, dtype, "emulated decay", atol=atol)
