"""One conformance suite for every backend, through the public API only, against independent values.

Each (backend, device) route is held against the oracle of tests/cases.py, which builds P(W) as the
dense group average of rho_out(g) T_g(W) rho_in(g)^T and the isotypic energies from the character
projectors; it shares no orbit table, no 1/|Stab| weight and no isotypic basis with the code under
test.  The penalty's gradient 2 (W - P W) and the energy's 2 P W are checked each on its own: their
sum is 2 W whatever P is, so a check of the sum alone cannot see a wrong projection.

Routes: reference / cpp / triton on CPU tensors (triton through Triton's interpreter, which
tests/conftest.py switches on when there is no GPU), reference / cuda / triton on CUDA tensors
(marked ``gpu``).  The interpreter is slow, so the Triton routes take a subsample of the case matrix.
"""
import functools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import projkernels as pk
from projkernels.symmetry.steerable import BlockType, SteerableSymmetry

from cases import ALL_CASES, CASES_3D, Oracle, c2_x_c4, case_id, oracle_for, seeded_weight, shape_for

HALF = (torch.float16, torch.bfloat16)

# (backend, device); the CUDA-device routes need a GPU.
ROUTES = [("reference", "cpu"), ("cpp", "cpu"), ("triton", "cpu"),
          ("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]


def _slow(backend, device):
    # Triton: the interpreter on CPU, and a compile per new shape and group on the GPU.
    return backend == "triton"


def _marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []


def _params(full, subsample, *extra_ids):
    """pytest params (backend, device, item) over the routes: ``full`` items, or ``subsample`` on slow routes."""
    out = []
    for backend, device in ROUTES:
        for item in (subsample if _slow(backend, device) else full):
            ident = "-".join([backend, device] + [f(item) for f in extra_ids])
            out.append(pytest.param(backend, device, item, marks=_marks(device), id=ident))
    return out


def _route_params():
    return [pytest.param(b, d, marks=_marks(d), id=f"{b}-{d}") for b, d in ROUTES]


def _triton_required(device):
    # With PROJKERNELS_REQUIRE_TRITON=1 the Triton routes of the machine's own device must run:
    # the GPU when there is one, the interpreter otherwise.
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ.get("PROJKERNELS_REQUIRE_TRITON") == "1" and device == expected


def _why_unavailable(backend, device):
    try:
        pk.projected_penalty(torch.zeros(1, 1, device=device), "C1", backend=backend)
    except RuntimeError as e:
        return str(e)
    return None


@pytest.fixture(autouse=True)
def _usable(request):
    """Skip (or, where the environment requires the route, fail) a route that cannot run here."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or "backend" not in callspec.params:
        return
    backend, device = callspec.params["backend"], callspec.params["device"]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend not in pk.available_backends(device):
        reason = _why_unavailable(backend, device) or f"{backend} is not available on {device}"
        if backend == "triton" and _triton_required(device):
            pytest.fail(f"PROJKERNELS_REQUIRE_TRITON=1 but the Triton route cannot run: {reason}")
        pytest.skip(reason)


def _close(got, expected, rtol, atol, what):
    torch.testing.assert_close(got.detach().to(device="cpu", dtype=torch.float64), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# --- float64: every case of the matrix ---------------------------------------------------------

# Group orders beyond the case matrix, up to the compiled kernels' bound of 64 (kernel-free weights).
LARGE_GROUPS = [(g, shape_for(g, ir, orr, (), ci, co), ir, orr) for g, ir, orr, ci, co in
                [("C16", "regular", "regular", 1, 2), ("D16", "regular", "trivial", 2, 2),
                 ("C64", "trivial", "regular", 2, 1), ("D32", "regular", "regular", 1, 1),
                 ("C64", "regular", "regular", 1, 1), ("D16", "trivial", "trivial", 3, 2)]]
# The cube groups on Conv3d weights: on the slow routes a few, Oh's 48-channel regular fields included.
CUBE_SUBSAMPLE = [c for c in CASES_3D if case_id(c) in {
    "Oh-48x48x2x2x2-reg-reg", "Oh-48x1x3x3x3-tri-reg", "O-1x24x3x3x3-reg-tri", "T-1x2x3x3x3-tri-tri",
    "O-24x24-reg-reg", "Oh-48x1x1x1x1-tri-reg"}]
CASES = ALL_CASES + CASES_3D + LARGE_GROUPS
SUBSAMPLE = ALL_CASES[::6] + CUBE_SUBSAMPLE + LARGE_GROUPS[::2]


@pytest.mark.parametrize("backend,device,case", _params(CASES, SUBSAMPLE, lambda c: case_id(c)))
def test_values_match_oracle(backend, device, case):
    group, shape, ir, orr = case
    o = oracle_for(case)
    w = o.w.to(device)
    kw = dict(group=group, in_rep=ir, out_rep=orr, backend=backend)
    norm2 = float(o.w.square().sum())
    tol = dict(rtol=1e-12, atol=1e-12 * norm2)

    penalty, energy = pk.penalty_and_energy(w, **kw)
    assert penalty.shape == energy.shape == () and penalty.dtype == energy.dtype == torch.float64
    assert penalty.device.type == device
    _close(penalty, o.penalty, what="penalty", **tol)
    _close(energy, o.energy, what="equivariant energy", **tol)
    _close(pk.projected_penalty(w, **kw), o.penalty, what="projected_penalty", **tol)
    _close(pk.equivariant_energy(w, **kw), o.energy, what="equivariant_energy", **tol)

    p = pk.project(w, **kw)
    assert p.shape == w.shape and p.dtype == torch.float64 and p.device.type == device
    _close(p, o.p, rtol=1e-12, atol=1e-12 * float(o.w.abs().max()), what="project")

    spec = pk.spectrum(w, **kw)
    assert spec.shape == (len(pk.irrep_names(group)),) and spec.dtype == torch.float64
    _close(spec, o.spectrum, rtol=1e-10, atol=1e-12 * norm2, what="spectrum (per irrep)")


@pytest.mark.parametrize("backend,device,case", _params(CASES, SUBSAMPLE, lambda c: case_id(c)))
def test_gradients_match_oracle(backend, device, case):
    group, shape, ir, orr = case
    o = oracle_for(case)
    kw = dict(group=group, in_rep=ir, out_rep=orr, backend=backend)
    atol = 1e-12 * float(o.w.abs().max())
    w = o.w.to(device).requires_grad_(True)

    g_pen, = torch.autograd.grad(pk.projected_penalty(w, **kw), w)
    _close(g_pen, o.grad_penalty, rtol=1e-12, atol=atol, what="d penalty / dW = 2 (W - P W)")
    g_eq, = torch.autograd.grad(pk.equivariant_energy(w, **kw), w)
    _close(g_eq, o.grad_energy, rtol=1e-12, atol=atol, what="d energy / dW = 2 P W")
    # Both terms weighted differently in one backward pass, as a training loss has them.
    penalty, energy = pk.penalty_and_energy(w, **kw)
    g_mix, = torch.autograd.grad(0.7 * penalty - 1.3 * energy, w)
    _close(g_mix, 0.7 * o.grad_penalty - 1.3 * o.grad_energy, rtol=1e-12, atol=4 * atol,
           what="d (0.7 penalty - 1.3 energy) / dW")
    # The projection's vector-Jacobian product is P itself (P is self-adjoint).
    g_proj, = torch.autograd.grad(pk.project(w, **kw), w, grad_outputs=o.w.flip(0).contiguous().to(device))
    _close(g_proj, Oracle(o.w.flip(0).contiguous(), group, ir, orr).p, rtol=1e-12, atol=atol,
           what="vjp of project")


@pytest.mark.parametrize("backend,device", _route_params())
def test_group_given_as_data(backend, device):
    """A finite group that is neither C_N nor D_N (C2 x C4, registered by passing the object)."""
    G = c2_x_c4()
    for ir, orr, shape in [("regular", "regular", (16, 8)), ("trivial", "regular", (8, 3)),
                           ("regular", "trivial", (2, 16, 1, 1))]:
        w = seeded_weight(("C2xC4", shape, ir, orr))
        o = Oracle(w, G, ir, orr)
        kw = dict(group=G, in_rep=ir, out_rep=orr, backend=backend)
        norm2 = float(o.w.square().sum())
        wd = w.to(device).requires_grad_(True)
        penalty, energy = pk.penalty_and_energy(wd, **kw)
        _close(penalty, o.penalty, rtol=1e-12, atol=1e-12 * norm2, what="penalty")
        _close(energy, o.energy, rtol=1e-12, atol=1e-12 * norm2, what="energy")
        _close(pk.project(wd.detach(), **kw), o.p, rtol=1e-12, atol=1e-13, what="project")
        _close(pk.spectrum(wd, **kw), o.spectrum, rtol=1e-10, atol=1e-12 * norm2, what="spectrum (per irrep)")
        g_pen, = torch.autograd.grad(penalty, wd)
        _close(g_pen, o.grad_penalty, rtol=1e-12, atol=1e-12, what="d penalty / dW")


# --- the other dtypes ----------------------------------------------------------------------------

DTYPE_CASES = [(c, dt) for c in ALL_CASES[1::9] + CASES_3D[2::9] for dt in (torch.float32,) + HALF]
DTYPE_SUBSAMPLE = [(c, dt) for c in ALL_CASES[1::27] + CUBE_SUBSAMPLE[:2] for dt in (torch.float32,) + HALF]


def _ulp_close(got, expected, dtype, scale, what, factor=1.0):
    """got (rounded to ``dtype`` once from float32 math) vs the float64 value: one rounding plus the
    float32 accumulation error (relative to the largest magnitude involved) apart at most."""
    got = got.detach().to(device="cpu", dtype=torch.float64)
    err = (got - expected).abs()
    bound = torch.finfo(dtype).eps * expected.abs() + factor * 64 * torch.finfo(torch.float32).eps * scale
    worst = float((err - bound).max())
    assert worst <= 0, f"{what}: off by up to {float(err.max()):.3g} (bound exceeded by {worst:.3g})"


@pytest.mark.parametrize("backend,device,item", _params(DTYPE_CASES, DTYPE_SUBSAMPLE,
                                                        lambda i: case_id(i[0]), lambda i: str(i[1])[6:]))
def test_low_precision_dtypes(backend, device, item):
    case, dtype = item
    group, shape, ir, orr = case
    o = oracle_for(case, dtype)            # the oracle of the rounded weight, in float64
    w = o.w.to(device=device, dtype=dtype)
    assert torch.equal(w.double().cpu(), o.w)
    kw = dict(group=group, in_rep=ir, out_rep=orr, backend=backend)
    norm2 = float(o.w.square().sum())
    wmax = float(o.w.abs().max())

    penalty, energy = pk.penalty_and_energy(w, **kw)
    assert penalty.dtype == energy.dtype == torch.float32, "half and single weights give float32 results"
    _close(penalty, o.penalty, rtol=1e-5, atol=1e-6 * norm2, what="penalty")
    _close(energy, o.energy, rtol=1e-5, atol=1e-6 * norm2, what="equivariant energy")
    spec = pk.spectrum(w, **kw)
    assert spec.dtype == torch.float32
    _close(spec, o.spectrum, rtol=1e-5, atol=1e-6 * norm2, what="spectrum (per irrep)")

    p = pk.project(w, **kw)
    assert p.dtype == dtype and p.shape == w.shape
    _ulp_close(p, o.p, dtype, wmax, "project")

    wr = w.clone().requires_grad_(True)
    g_pen, = torch.autograd.grad(pk.projected_penalty(wr, **kw), wr)
    assert g_pen.dtype == dtype
    _ulp_close(g_pen, o.grad_penalty, dtype, 2 * wmax, "d penalty / dW = 2 (W - P W)")
    g_eq, = torch.autograd.grad(pk.equivariant_energy(wr, **kw), wr)
    assert g_eq.dtype == dtype
    _ulp_close(g_eq, o.grad_energy, dtype, 2 * wmax, "d energy / dW = 2 P W")


@pytest.mark.parametrize("backend,device", _route_params())
def test_nearly_equivariant_float32_keeps_relative_accuracy(backend, device):
    # The penalty comes from deviations: at penalty / ||W||^2 ~ 1e-8 float32 still gives 4 digits
    # (||W||^2 - ||P W||^2 would give none).
    case = ("D4", (16, 8, 3, 3), "regular", "regular")
    w0 = seeded_weight(case)
    base = Oracle(w0, *case[:1], *case[2:]).p
    w32 = (base + 1e-4 * seeded_weight(case, salt="noise")).float()
    o = Oracle(w32.double(), "D4", "regular", "regular")
    assert float(o.penalty) / float(o.w.square().sum()) < 1e-7
    kw = dict(group="D4", in_rep="regular", out_rep="regular", backend=backend)
    _close(pk.projected_penalty(w32.to(device), **kw), o.penalty, rtol=1e-4, atol=0, what="penalty")
    _close(pk.spectrum(w32.to(device), **kw)[1:].sum(), o.penalty, rtol=1e-4, atol=0, what="non-trivial spectrum")


# --- input handling --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", _route_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(backend, device, dtype):
    big = seeded_weight(("D2", (3, 8, 16, 5, 5), "x", "x")).to(device=device, dtype=dtype)
    views = [big[1],                                                  # offset into storage
             big[0, :, ::2],                                          # strided channel slice
             big[2].transpose(0, 1)[:8, :16].transpose(0, 1).transpose(2, 3),   # permuted strides
             big[0].permute(0, 1, 3, 2)[:, :, 1:4, 1:4]]              # strided kernel window
    kw = dict(group="D2", in_rep="trivial", out_rep="trivial", backend=backend)
    for i, v in enumerate(views):
        assert not v.is_contiguous() or v.storage_offset() > 0
        o = Oracle(v.double().cpu(), "D2", "trivial", "trivial")
        norm2, wmax = float(o.w.square().sum()), float(o.w.abs().max())
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        penalty, energy = pk.penalty_and_energy(v, **kw)
        _close(penalty, o.penalty, rtol=rtol, atol=rtol * norm2, what=f"view {i}: penalty")
        _close(energy, o.energy, rtol=rtol, atol=rtol * norm2, what=f"view {i}: energy")
        _close(pk.spectrum(v, **kw), o.spectrum, rtol=10 * rtol, atol=rtol * norm2, what=f"view {i}: spectrum")
        _ulp_close(pk.project(v, **kw), o.p, dtype, wmax, f"view {i}: project")
    # The gradient of a strided view lands in the right entries of its base.
    leaf = big.clone().requires_grad_(True)
    view = leaf[0, :, ::2]
    pk.projected_penalty(view, **kw).backward()
    o = Oracle(view.detach().double().cpu(), "D2", "trivial", "trivial")
    expected = torch.zeros(big.shape, dtype=torch.float64)
    expected[0, :, ::2] = o.grad_penalty
    _ulp_close(leaf.grad, expected, dtype, 2 * float(o.w.abs().max()), "gradient through a strided view")


@pytest.mark.parametrize("backend,device", _route_params())
def test_gradcheck(backend, device):
    # Numerical against analytic derivatives, first and second order, on small float64 weights.
    for group, shape, ir, orr in [("C4", (4, 1, 2, 2), "trivial", "regular"), ("D2", (2, 4, 3), "regular", "trivial"),
                                  ("C3", (3, 6), "regular", "regular")]:
        w = seeded_weight((group, shape, ir, orr)).to(device).requires_grad_(True)
        kw = dict(group=group, in_rep=ir, out_rep=orr, backend=backend)
        fast = _slow(backend, device)
        assert torch.autograd.gradcheck(lambda x: pk.penalty_and_energy(x, **kw), (w,), fast_mode=fast)
        assert torch.autograd.gradcheck(lambda x: pk.project(x, **kw), (w,), fast_mode=fast)
        assert torch.autograd.gradgradcheck(
            lambda x: 0.3 * pk.projected_penalty(x, **kw) - 1.7 * pk.equivariant_energy(x, **kw), (w,),
            fast_mode=fast)


BAD = [
    (lambda d, b: pk.projected_penalty(torch.randn(6, 4, 3, 3, device=d), "C4", "trivial", "regular", backend=b),
     ValueError, r"weight: dim 0 .* multiple of the regular field size 4"),
    (lambda d, b: pk.equivariant_energy(torch.randn(4, 6, 3, 3, device=d), "C4", "regular", "trivial", backend=b),
     ValueError, r"weight: dim 1 .* multiple of the regular field size 4"),
    (lambda d, b: pk.project(torch.randn(4, 4, 3, 3, device=d), "X4", backend=b), ValueError, r"group: unknown group"),
    (lambda d, b: pk.spectrum(torch.randn(4, 4, 3, 3, device=d), "C4", "irregular", backend=b), ValueError,
     r"in_rep: unknown representation"),
    (lambda d, b: pk.penalty_and_energy(torch.randn(4, 4, 3, 3, device=d), "C8", backend=b), ValueError,
     r"group: C8 does not act exactly on a 3x3 kernel"),
    (lambda d, b: pk.projected_penalty(torch.randn(4, 4, 3, 5, device=d), "C4", backend=b), ValueError,
     r"must be square; got a 3x5"),
    (lambda d, b: pk.projected_penalty(torch.ones(4, 4, 3, 3, dtype=torch.int32, device=d), backend=b), TypeError,
     r"weight: expected a floating"),
    (lambda d, b: pk.project(torch.randn(4, 4, 3, 3, 3, 3, device=d), backend=b), ValueError, r"weight: expected shape"),
    (lambda d, b: pk.project(torch.randn(4, 4, 3, 3, 3, device=d), backend=b), ValueError,
     r"group: C4 acts on 1-D and 2-D kernels"),
    (lambda d, b: pk.project(torch.randn(4, 4, 3, 3, device=d), "O", backend=b), ValueError,
     r"group: O acts on 3-D kernels"),
    (lambda d, b: pk.multi_penalty([(torch.randn(4, 4, device=d), "C4", "regular", "regular"),
                                    (torch.randn(6, 4, device=d), "C4", "regular", "regular")], backend=b),
     ValueError, r"items\[1\].*dim 0"),
]


@pytest.mark.parametrize("backend,device", _route_params())
def test_errors_name_the_argument(backend, device):
    for i, (call, exc, message) in enumerate(BAD):
        with pytest.raises(exc, match=message):
            call(device, backend)


def test_backend_on_the_wrong_device_says_why():
    # A CPU tensor can never use the CUDA backend; the compiled CPU backend never serves CUDA tensors.
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot serve a weight on cpu: .+"):
        pk.projected_penalty(torch.randn(4, 4, 3, 3), backend="cuda")
    if torch.cuda.is_available() and "cpp" in pk.available_backends("cpu"):
        with pytest.raises(RuntimeError, match=r"backend='cpp' cannot serve a weight on cuda"):
            pk.projected_penalty(torch.randn(4, 4, 3, 3, device="cuda"), backend="cpp")


# --- whole models: multi_penalty ----------------------------------------------------------------

# Consecutive layers share a shape and a spec (with different weights), so a kernel that reads a
# neighbouring layer's weight reads valid memory and returns plausible, wrong numbers.
MULTI_SPECS = [
    ((8, 3, 3, 3), "C4", "trivial", "regular"),
    ((8, 8, 3, 3), "C4", "regular", "regular"),
    ((8, 8, 3, 3), "C4", "regular", "regular"),
    ((16, 8, 3, 3), "D4", "regular", "regular"),
    ((16, 8, 3, 3), "D4", "regular", "regular"),
    ((5, 16, 1, 1), "D4", "regular", "trivial"),
    ((6, 9), "C3", "regular", "trivial"),
    ((4, 2, 5), "D1", "trivial", "regular"),
    ((4, 2, 5), "D1", "trivial", "regular"),
    ((16, 8), "C8", "regular", "trivial"),
    # Trivial fields on both sides: orbits with non-trivial stabilisers (the centre of a kernel).
    ((4, 6, 3, 3), "C4", "trivial", "trivial"),
    ((4, 6, 3, 3), "C4", "trivial", "trivial"),
    ((3, 2, 5, 5), "D4", "trivial", "trivial"),
    ((3, 4, 5), "D2", "trivial", "trivial"),
    # Conv3d layers under the cube groups, Oh's 48-channel regular fields among them.
    ((48, 2, 3, 3, 3), "Oh", "trivial", "regular"),
    ((48, 48, 2, 2, 2), "Oh", "regular", "regular"),
    ((24, 24, 3, 3, 3), "O", "regular", "regular"),
    ((2, 12, 3, 3, 3), "T", "regular", "trivial"),
]
MULTI_DTYPES = {
    "float64": [torch.float64] * len(MULTI_SPECS),
    "float32": [torch.float32] * len(MULTI_SPECS),
    "bfloat16": [torch.bfloat16] * len(MULTI_SPECS),
    "mixed": [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float16, torch.float32,
              torch.bfloat16, torch.float32, torch.float32, torch.float16, torch.float32, torch.float32,
              torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16, torch.float32],
}


def _multi_oracles(dtypes):
    ws = [seeded_weight((s[1], s[0], s[2], s[3]), dt, salt=f"layer{i}") for i, (s, dt) in
          enumerate(zip(MULTI_SPECS, dtypes))]
    return ws, [Oracle(w, *s[1:]) for w, s in zip(ws, MULTI_SPECS)]


@pytest.mark.parametrize("backend,device,dtypes", _params(list(MULTI_DTYPES), ["float64", "mixed"], str))
def test_multi_penalty_per_layer(backend, device, dtypes):
    ws, oracles = _multi_oracles(MULTI_DTYPES[dtypes])
    assert not torch.equal(ws[1], ws[2]) and not torch.equal(ws[3], ws[4]) and not torch.equal(ws[10], ws[11])
    exact = dtypes == "float64"
    rtol = 1e-12 if exact else 1e-5
    leaves = [w.detach().clone().to(device).requires_grad_(True) for w in ws]
    items = [(w, *s[1:]) for w, s in zip(leaves, MULTI_SPECS)]
    tp, te, pp, pe = pk.multi_penalty(items, backend=backend)
    acc = torch.float64 if exact else torch.float32
    assert tp.dtype == te.dtype == pp.dtype == pe.dtype == acc and pp.shape == pe.shape == (len(ws),)
    norm2 = max(float(o.w.square().sum()) for o in oracles)
    _close(pp, torch.stack([o.penalty for o in oracles]), rtol=rtol, atol=rtol * 1e-2 * norm2,
           what="per-layer penalties")
    _close(pe, torch.stack([o.energy for o in oracles]), rtol=rtol, atol=rtol * 1e-2 * norm2,
           what="per-layer energies")
    _close(tp, sum(o.penalty for o in oracles), rtol=rtol, atol=0, what="total penalty")
    _close(te, sum(o.energy for o in oracles), rtol=rtol, atol=0, what="total energy")

    def check(grads, expected, what):
        for i, (g, e, w) in enumerate(zip(grads, expected, ws)):
            assert g.dtype == w.dtype and g.shape == w.shape, f"{what}, layer {i}"
            if exact:
                _close(g, e, rtol=1e-12, atol=1e-12 * float(e.abs().max() + 1), what=f"{what}, layer {i}")
            else:
                _ulp_close(g, e, w.dtype, 2 * float(w.double().abs().max()), f"{what}, layer {i}")

    check(torch.autograd.grad(tp, leaves, retain_graph=True), [o.grad_penalty for o in oracles],
          "d total penalty / dW_l = 2 (W_l - P W_l)")
    check(torch.autograd.grad(te, leaves, retain_graph=True), [o.grad_energy for o in oracles],
          "d total energy / dW_l = 2 P W_l")
    c = torch.linspace(0.5, 2.0, len(ws), dtype=acc, device=device)
    d = torch.linspace(-1.0, 1.5, len(ws), dtype=acc, device=device)
    check(torch.autograd.grad((c * pp).sum() + (d * pe).sum(), leaves, retain_graph=True),
          [float(ci) * o.grad_penalty + float(di) * o.grad_energy for ci, di, o in zip(c.cpu(), d.cpu(), oracles)],
          "per-layer weights on penalties and energies")
    # One layer's penalty alone: its own gradient, zero everywhere else.
    check(torch.autograd.grad(pp[2], leaves, allow_unused=True, materialize_grads=True),
          [o.grad_penalty if i == 2 else torch.zeros_like(o.w) for i, o in enumerate(oracles)],
          "d penalty[2] / dW_l")


# --- opcheck of the public ops ----------------------------------------------------------------------

class _Recorder(TorchDispatchMode):
    """Records the outermost calls into the projkernels op namespaces that the public API makes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace.startswith("projkernels"):
            copy = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.calls.append((func, tree_map(copy, args), tree_map(copy, kwargs)))
        return func(*args, **kwargs)


def _projkernels_ops():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.split("::")[0].startswith("projkernels")]
    return sorted(names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_public_ops(dtype):
    """torch.library.opcheck on every projkernels op the public API calls on CPU, whatever layer
    (Python custom ops or C++ ops) provides them.  bfloat16 checks that the fake kernels return the
    float32 results that half types get."""
    assert _projkernels_ops(), "no projkernels ops are registered"
    rec = _Recorder()
    w = seeded_weight(("D4", (8, 4, 3, 3), "trivial", "regular"), dtype).requires_grad_(True)
    w2 = seeded_weight(("C4", (4, 4), "regular", "regular"), dtype).requires_grad_(True)
    with rec:
        penalty, energy = pk.penalty_and_energy(w, "D4", "trivial", "regular")
        (penalty + 0.5 * energy).backward()
        pk.project(w, "D4", "trivial", "regular").sum().backward()
        pk.spectrum(w, "D4", "trivial", "regular")
        tp, te, _, _ = pk.multi_penalty([(w, "D4", "trivial", "regular"), (w2, "C4", "regular", "regular")])
        (tp + te).backward()
    assert rec.calls, "the public API made no projkernels op call"
    checked = set()
    for func, args, kwargs in rec.calls:
        if func in checked:
            continue
        checked.add(func)
        name = func.name()
        grad = torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")

        def prepare(x):
            if grad and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0:
                return x.requires_grad_(True)
            return x

        try:
            torch.library.opcheck(func, tree_map(prepare, args), tree_map(prepare, kwargs))
        except Exception as e:  # noqa: BLE001
            # An op without a derivative (spectrum) is checked on inputs that do not require grad.
            if "no autograd formula" not in str(e):
                raise
            strip = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731
            torch.library.opcheck(func, tree_map(strip, args), tree_map(strip, kwargs))
    assert all(f.name() in _projkernels_ops() for f in checked)
    print("opchecked:", sorted(f.name() for f in checked))
    # At least a forward, a backward and the spectrum went through opcheck.
    assert len(checked) >= 3, sorted(f.name() for f in checked)


# --- second derivatives on every route -----------------------------------------------------------

class _SyntheticSteerable(SteerableSymmetry):
    """A steerable symmetry without escnn: an nn.Linear weight between fields of sizes ``out_fields``
    and ``in_fields``, one block type per pair of sizes with a random orthonormal Q_t of the given
    rank (rank 0 included: that block's whole weight is penalised).  It goes through the same
    layouts and routes as one read off escnn."""

    def __init__(self, out_fields, in_fields, ranks, seed):
        g = torch.Generator().manual_seed(seed)
        offsets = lambda sizes: [sum(sizes[:i]) for i in range(len(sizes))]  # noqa: E731
        out_off, in_off = offsets(out_fields), offsets(in_fields)
        self.types = []
        for d_out in sorted(set(out_fields)):
            for d_in in sorted(set(in_fields)):
                m, r = d_out * d_in, ranks[(d_out, d_in)]
                q = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))[0][:, :r]
                self.types.append(BlockType(f"o{d_out}", f"i{d_in}", d_out, d_in,
                                            tuple(o for o, d in zip(out_off, out_fields) if d == d_out),
                                            tuple(i for i, d in zip(in_off, in_fields) if d == d_in), q))
        self.in_type = self.out_type = self.kernel_size = self.basis_options = None
        self.spatial_dims = 0
        self.weight_shape = (sum(out_fields), sum(in_fields))
        self.numel = self.weight_shape[0] * self.weight_shape[1]
        self.dim = sum(t.n_blocks * t.rank for t in self.types)
        self._device_cache = {}

    def __repr__(self):
        return f"synthetic steerable symmetry {self.weight_shape}"

    def dense_projection(self) -> torch.Tensor:
        """[numel, numel] float64 projector assembled block by block: the oracle for P here."""
        c_in = self.weight_shape[1]
        P = torch.zeros(self.numel, self.numel, dtype=torch.float64)
        idx = torch.arange(self.numel).reshape(self.weight_shape)
        for t in self.types:
            for o in t.out_fields:
                for i in t.in_fields:
                    e = idx[o:o + t.d_out, i:i + t.d_in].reshape(-1)
                    P[e[:, None], e[None, :]] = t.q @ t.q.T
        assert c_in == idx.shape[1]
        return P


@functools.lru_cache(maxsize=None)
def _synthetic_steerable():
    # Fields of two sizes, unevenly placed; a rank-0 type among them.  Tiny: Triton's interpreter
    # runs every numerical derivative of gradgradcheck.
    return _SyntheticSteerable([2, 1, 2], [2, 1], {(2, 2): 2, (2, 1): 1, (1, 2): 0, (1, 1): 1}, seed=7)


def _second_order_items(kind):
    """(weight, group, in_rep, out_rep) of two small layers: finite groups, or a steerable symmetry
    next to a finite group (the mixed multi-tensor plan)."""
    c4 = (seeded_weight(("C4", (4, 4), "regular", "regular"), salt="hessian"), "C4", "regular", "regular")
    if kind == "finite":
        d2 = (seeded_weight(("D2", (2, 8), "regular", "trivial"), salt="hessian"), "D2", "regular", "trivial")
        return [c4, d2]
    sym = _synthetic_steerable()
    w = torch.randn(sym.weight_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    return [(w, sym, "trivial", "trivial"), c4]


class _ModelPenalty(torch.nn.Module):
    """``model_penalty`` of ``net`` as a module's forward, so that torch.func.functional_call can
    hand it the parameters as explicit inputs."""

    def __init__(self, net, lambda_perp, lambda_G):
        super().__init__()
        self.net, self.lambdas = net, (lambda_perp, lambda_G)

    def forward(self):
        return pk.model_penalty(self.net, *self.lambdas)


def _second_order_model(kind, backend, device):
    """A model of two attached Linear layers (regular-field biases on the finite one) and its
    parameters: finite groups, or a steerable layer next to a finite one."""
    items = _second_order_items(kind)
    net = torch.nn.ModuleList()
    for w, group, ir, orr in items:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=orr == "regular").to(device=device, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(w)
            if layer.bias is not None:
                layer.bias.copy_(seeded_weight(("C4", (w.shape[0],), "bias", "bias"), salt="hessian"))
        pk.attach_symmetry(layer, group, ir, orr, backend=backend)
        net.append(layer)
    return net


@pytest.mark.parametrize("route", ["single", "project", "multi", "model"])
@pytest.mark.parametrize("kind", ["finite", "steerable"])
@pytest.mark.parametrize("backend,device", _route_params())
def test_second_derivatives(backend, device, kind, route):
    """gradgradcheck on every (backend, route): a route whose backward is not differentiable gives a
    first derivative with no graph, and its second derivative (zero) disagrees with the numerical one."""
    items = [(w.to(device).requires_grad_(True), *rest) for w, *rest in _second_order_items(kind)]
    fast = _slow(backend, device)
    if route in ("single", "project"):
        w, group, ir, orr = items[0]
        kw = dict(group=group, in_rep=ir, out_rep=orr, backend=backend)
        f = (lambda x: pk.penalty_and_energy(x, **kw)) if route == "single" else (lambda x: pk.project(x, **kw))
        inputs = (w,)
    elif route == "multi":
        def f(*ws):
            return pk.multi_penalty([(x, *item[1:]) for x, item in zip(ws, items)], backend=backend)
        inputs = tuple(w for w, *_ in items)
    else:
        wrapper = _ModelPenalty(_second_order_model(kind, backend, device), 1.3, 0.4)
        names = [n for n, _ in wrapper.named_parameters()]
        inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters())
        assert len(names) == 3, names  # two weights and the regular-field bias of the C4 layer

        def f(*params):
            return torch.func.functional_call(wrapper, dict(zip(names, params)), ())
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast)


def _reference_projection(item):
    """v -> P v of one item on the reference route (the Hessian's oracle below)."""
    _, group, ir, orr = item
    return lambda v: pk.project(v, group, ir, orr, backend="reference")


@pytest.mark.parametrize("kind", ["finite", "steerable"])
@pytest.mark.parametrize("backend,device", _route_params())
def test_hessian_vector_products(backend, device, kind):
    """d/dW <grad (loss + penalty), V> through create_graph=True: the penalty's Hessian is 2 (I - P) and
    the energy's 2 P, per layer, with P from the reference route; the bias term's Hessian is 2 (I - P_b)
    with P_b the field means (a bias of regular fields is a [C, 1] weight with trivial input)."""
    items = _second_order_items(kind)
    gen = torch.Generator().manual_seed(3)
    vs = [torch.randn(w.shape, dtype=torch.float64, generator=gen) for w, *_ in items]
    pvs = [_reference_projection(item)(v) for item, v in zip(items, vs)]
    if kind == "steerable":  # the reference route itself against the dense block projector
        P = _synthetic_steerable().dense_projection()
        _close(pvs[0], (P @ vs[0].reshape(-1)).reshape(vs[0].shape), rtol=0, atol=1e-13, what="reference P v")
    atol = 1e-12

    # multi_penalty: a loss with Hessian I (0.5 ||W||^2) plus 0.7 penalty + 0.2 energy, per layer.
    leaves = [w.to(device).requires_grad_(True) for w, *_ in items]
    tp, te, _, _ = pk.multi_penalty([(x, *item[1:]) for x, item in zip(leaves, items)], backend=backend)
    total = sum(0.5 * x.square().sum() for x in leaves) + 0.7 * tp + 0.2 * te
    grads = torch.autograd.grad(total, leaves, create_graph=True)
    assert all(g.requires_grad for g in grads), "create_graph=True gave a gradient with no graph"
    hv = torch.autograd.grad(sum((g * v.to(device)).sum() for g, v in zip(grads, vs)), leaves)
    for i, (h, v, pv) in enumerate(zip(hv, vs, pvs)):
        _close(h, v + 1.4 * (v - pv) + 0.4 * pv, rtol=0, atol=atol, what=f"multi_penalty: H v, layer {i}")

    # model_penalty(model, 1.3, 0.4): weights and the finite layer's regular-field bias.
    net = _second_order_model(kind, backend, device)
    params = list(net.parameters())
    pen = pk.model_penalty(net, 1.3, 0.4)
    grads = torch.autograd.grad(pen, params, create_graph=True)
    assert all(g.requires_grad for g in grads), "create_graph=True gave a gradient with no graph"
    dirs = {id(layer.weight): (v, pv) for layer, v, pv in zip(net, vs, pvs)}
    for layer in net:
        if layer.bias is not None:
            vb = torch.randn(layer.bias.shape, dtype=torch.float64, generator=gen)
            pvb = pk.project(vb.reshape(-1, 1), "C4", "trivial", "regular", backend="reference").reshape(-1)
            dirs[id(layer.bias)] = (vb, pvb)
    assert len(dirs) == len(params)
    hv = torch.autograd.grad(sum((g * dirs[id(p)][0].to(device)).sum() for g, p in zip(grads, params)), params)
    for p, h in zip(params, hv):
        v, pv = dirs[id(p)]
        expected = 2 * 1.3 * (v - pv) + (2 * 0.4 * pv if p.dim() > 1 else 0)  # lambda_G acts on weights only
        _close(h, expected, rtol=0, atol=atol, what=f"model_penalty: H v, parameter of shape {tuple(p.shape)}")


@pytest.mark.parametrize("backend,device", _route_params())
def test_steerable_bias_second_derivatives(backend, device):
    """model_penalty of an escnn layer with a bias: the bias term's Hessian is 2 (I - P_b), where P_b
    keeps the channels of the trivial irrep's field and zeroes the others (fields of irreps 1 and 2
    hold no trivial part)."""
    pytest.importorskip("escnn")
    from escnn import gspaces, nn as enn
    from escnn.group import so2_group
    G = so2_group(2)
    gs = gspaces.no_base_space(G)
    sym = pk.steerable(enn.FieldType(gs, [G.irrep(0), G.irrep(1)]), enn.FieldType(gs, [G.irrep(1), G.irrep(0), G.irrep(2)]))
    layer = torch.nn.Linear(3, 5).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(seeded_weight(("SO2", (5, 3), "steerable", "bias"), salt="hessian"))
        layer.bias.copy_(seeded_weight(("SO2", (5,), "steerable", "bias"), salt="hessian"))
    pk.attach_symmetry(layer, sym, backend=backend)
    keep = torch.tensor([0, 0, 1, 0, 0], dtype=torch.float64)  # out channels: irrep 1 (2), irrep 0 (1), irrep 2 (2)

    wrapper = _ModelPenalty(layer, 1.3, 0.4)
    names = [n for n, _ in wrapper.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters())
    assert torch.autograd.gradgradcheck(lambda *ps: torch.func.functional_call(wrapper, dict(zip(names, ps)), ()),
                                        inputs, fast_mode=_slow(backend, device))

    gen = torch.Generator().manual_seed(5)
    vw, vb = (torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in (layer.weight, layer.bias))
    grads = torch.autograd.grad(pk.model_penalty(layer, 1.3, 0.4), [layer.weight, layer.bias], create_graph=True)
    hw, hb = torch.autograd.grad((grads[0] * vw.to(device)).sum() + (grads[1] * vb.to(device)).sum(),
                                 [layer.weight, layer.bias])
    pvw = pk.project(vw, sym, backend="reference")
    _close(hw, 2 * 1.3 * (vw - pvw) + 2 * 0.4 * pvw, rtol=0, atol=1e-12, what="model_penalty: H v, weight")
    _close(hb, 2 * 1.3 * (vb - keep * vb), rtol=0, atol=1e-12, what="model_penalty: H v, bias")
