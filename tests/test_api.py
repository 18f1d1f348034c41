"""The public API (SPEC section 5) on every backend that can serve CPU tensors."""
import pytest
import torch
import torch.nn.functional as F

import projkernels as pk
from projkernels.orbits import field_size
from projkernels.reference import brute_force_project

from cases import ALL_CASES, case_id, shape_for

# Triton on CPU tensors means its interpreter: far too slow for this whole matrix, and
# tests/test_triton_backend.py covers it.
BACKENDS = [b for b in pk.available_backends("cpu") if b != "triton"]
SOME_CASES = ALL_CASES[::5]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("case", SOME_CASES, ids=case_id)
def test_projection_properties(case, backend):
    group, shape, ir, orr = case
    w = torch.randn(shape, dtype=torch.float64)
    kw = dict(group=group, in_rep=ir, out_rep=orr, backend=backend)
    p = pk.project(w, **kw)
    torch.testing.assert_close(p, brute_force_project(w, group, ir, orr), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pk.project(p, **kw), p, rtol=1e-12, atol=1e-12)            # idempotent
    assert abs(float((p * (w - p)).sum())) < 1e-10 * float(w.square().sum())                # orthogonal
    penalty, eq = pk.penalty_and_energy(w, **kw)
    torch.testing.assert_close(penalty + eq, w.square().sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(pk.projected_penalty(w, **kw), penalty)
    torch.testing.assert_close(pk.equivariant_energy(w, **kw), eq)
    spec = pk.spectrum(w, **kw)
    torch.testing.assert_close(spec.sum(), w.square().sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(spec[0], eq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spec[1:].sum(), penalty, rtol=1e-10, atol=1e-12)
    assert pk.projected_penalty(p, **kw) < 1e-20 * float(w.square().sum()) + 1e-28


def test_defaults_are_c4_trivial_to_trivial():
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(pk.projected_penalty(w), (w - brute_force_project(w, "C4")).square().sum())


# --- the meaning: P(W) is an equivariant layer, W is not --------------------------------------

def _act_on_features(x, G, g, rep):
    """rho(g) T_g on a feature tensor (batch, channels, *spatial), as on kernels."""
    size = field_size(rep, G)
    b, c = x.shape[:2]
    y = G.kernel_action(x, g) if x.dim() > 2 else x
    if rep == "regular":
        fields = y.reshape(b, c // size, size, *y.shape[2:])
        perm = torch.as_tensor(G.mul[G.inverse[g]])  # (rho(g) v)[gh] = v[h]  =>  new[c] = old[g^-1 c]
        y = fields[:, :, perm].reshape(y.shape)
    return y


LAYERS = [("C4", (3, 3), F.conv2d), ("D4", (4, 4), F.conv2d), ("D1", (3, 3), F.conv2d), ("C2", (2, 2), F.conv2d),
          ("C2", (3,), F.conv1d), ("D1", (4,), F.conv1d), ("C8", (), F.linear), ("D5", (), F.linear)]


@pytest.mark.parametrize("group,kernel,op", LAYERS, ids=[f"{g}-{len(k)}d" for g, k, _ in LAYERS])
@pytest.mark.parametrize("ir,orr", [("trivial", "regular"), ("regular", "regular"), ("regular", "trivial")])
def test_projected_layer_is_equivariant(group, kernel, op, ir, orr, backend):
    torch.manual_seed(0)
    G = pk.get_group(group)
    w = torch.randn(shape_for(group, ir, orr, kernel, 2, 3), dtype=torch.float64)
    pw = pk.project(w, group, ir, orr, backend=backend)
    x = torch.randn((2, w.shape[1]) + (9,) * len(kernel), dtype=torch.float64)
    worst_p = worst_w = 0.0
    for g in range(G.order):
        gx = _act_on_features(x, G, g, ir)
        for weight, store in ((pw, "p"), (w, "w")):
            lhs = op(gx, weight)
            rhs = _act_on_features(op(x, weight), G, g, orr)
            err = float((lhs - rhs).abs().max() / rhs.abs().max())
            if store == "p":
                worst_p = max(worst_p, err)
            else:
                worst_w = max(worst_w, err)
    assert worst_p < 1e-12
    assert worst_w > 1e-2


# --- autograd -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ALL_CASES[3::40], ids=case_id)
def test_gradcheck_float64(case, backend):
    group, shape, ir, orr = case
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    kw = dict(group=group, in_rep=ir, out_rep=orr, backend=backend)
    assert torch.autograd.gradcheck(lambda x: pk.penalty_and_energy(x, **kw), (w,))
    assert torch.autograd.gradcheck(lambda x: pk.project(x, **kw), (w,))
    assert torch.autograd.gradgradcheck(lambda x: sum(pk.penalty_and_energy(x, **kw)) + 0.5 * pk.projected_penalty(x, **kw),
                                        (w,))


def test_gradients_have_closed_form(backend):
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    kw = dict(group="C4", in_rep="regular", out_rep="trivial", backend=backend)
    penalty, eq = pk.penalty_and_energy(w, **kw)
    (3.0 * penalty + 0.5 * eq).backward()
    p = brute_force_project(w, "C4", "regular", "trivial")
    torch.testing.assert_close(w.grad, 6.0 * (w.detach() - p) + 1.0 * p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype, backend):
    torch.manual_seed(1)
    w = torch.randn(16, 8, 3, 3).to(dtype).requires_grad_()
    kw = dict(group="D4", in_rep="regular", out_rep="regular", backend=backend)
    penalty, eq = pk.penalty_and_energy(w, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert penalty.dtype == acc and eq.dtype == acc and penalty.shape == ()
    w64 = w.detach().double()
    expect = pk.penalty_and_energy(w64, **dict(kw, backend="reference"))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(penalty.double(), expect[0], rtol=tol, atol=0)
    torch.testing.assert_close(eq.double(), expect[1], rtol=tol, atol=0)
    penalty.backward()
    assert w.grad.dtype == dtype
    grad_tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(w.grad.double(), 2 * (w64 - brute_force_project(w64, "D4", "regular", "regular")),
                               rtol=grad_tol, atol=grad_tol)
    assert pk.project(w.detach(), **kw).dtype == dtype
    assert pk.spectrum(w, **kw).dtype == acc


def test_precision_nearly_equivariant_float32(backend):
    """Penalty from deviations: a 1e-8 relative penalty survives float32."""
    torch.manual_seed(2)
    kw = dict(group="C4", in_rep="regular", out_rep="regular", backend=backend)
    w0 = torch.randn(64, 64, 3, 3, dtype=torch.float64)
    w = (brute_force_project(w0, "C4", "regular", "regular") + 1e-4 * torch.randn_like(w0)).float()
    exact = pk.projected_penalty(w.double(), **kw)
    got = pk.projected_penalty(w, **kw)
    assert exact / w.double().square().sum() < 1e-7  # the regime the test is about
    assert abs(float(got) - float(exact)) <= 1e-3 * float(exact)
    spec = pk.spectrum(w, **kw)
    assert abs(float(spec[1:].sum()) - float(exact)) <= 1e-3 * float(exact)


# --- input handling ----------------------------------------------------------------------------

def test_non_contiguous_inputs(backend):
    torch.manual_seed(3)
    kw = dict(group="C4", in_rep="regular", out_rep="regular", backend=backend)
    base = torch.randn(8, 12, 3, 3, dtype=torch.float64)
    views = [base.transpose(0, 1)[:, :8],         # transposed view, then a slice
             torch.randn(16, 8, 3, 3, dtype=torch.float64)[::2],  # strided slice: 8 x 8
             base[:, 2:10],                         # column slice
             torch.randn(8, 8, 3, 3, dtype=torch.float64).transpose(2, 3)]
    for v in views:
        v = v.detach().requires_grad_()
        c = v.detach().contiguous().requires_grad_()
        assert not v.is_contiguous() or v.data_ptr() != c.data_ptr()
        pv, ev = pk.penalty_and_energy(v, **kw)
        pc, ec = pk.penalty_and_energy(c, **kw)
        torch.testing.assert_close(pv, pc, rtol=1e-14, atol=0)
        torch.testing.assert_close(ev, ec, rtol=1e-14, atol=0)
        torch.testing.assert_close(pk.project(v, **kw), pk.project(c, **kw))
        torch.testing.assert_close(pk.spectrum(v, **kw), pk.spectrum(c, **kw))
        (pv + 0.3 * ev).backward()
        (pc + 0.3 * ec).backward()
        torch.testing.assert_close(v.grad, c.grad)


BAD = [
    (lambda: pk.projected_penalty(torch.randn(6, 4, 3, 3), "C4", "trivial", "regular"), ValueError,
     r"weight: dim 0 .* multiple of the regular field size 4"),
    (lambda: pk.projected_penalty(torch.randn(4, 6, 3, 3), "C4", "regular", "trivial"), ValueError,
     r"weight: dim 1 .* multiple of the regular field size 4"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), "X4"), ValueError, r"group: unknown group 'X4'"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), 4), TypeError, r"group: expected"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), "C4", "irregular"), ValueError,
     r"in_rep: unknown representation 'irregular'"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), "C4", "trivial", None), TypeError, r"out_rep"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), "C8"), ValueError,
     r"group: C8 does not act exactly on a 3x3 kernel"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3), "C4"), ValueError,
     r"group: C4 does not act exactly on a 1-D kernel"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 5), "C4"), ValueError, r"must be square; got a 3x5"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 5), "D2"), ValueError, r"must be square"),
    (lambda: pk.projected_penalty(torch.randint(0, 3, (4, 4, 3, 3))), TypeError, r"weight: expected a floating"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3, dtype=torch.complex64)), TypeError, r"floating dtype"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3, 3)), ValueError, r"weight: expected shape"),
    (lambda: pk.projected_penalty(torch.randn(4)), ValueError, r"weight: expected shape"),
    (lambda: pk.projected_penalty([[1.0]]), TypeError, r"weight: expected a torch.Tensor"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), backend="fastest"), ValueError, r"backend: unknown"),
    (lambda: pk.spectrum(torch.randn(4, 4, 3, 3), "D0"), ValueError, r"N >= 1"),
    (lambda: pk.project(torch.randn(0, 4, 3, 3)), ValueError, r"dim 0"),
]


@pytest.mark.parametrize("call,exc,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_errors(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_unavailable_backend_says_why():
    missing = [b for b in ("cpp", "cuda", "triton") if b not in pk.available_backends("cpu")]
    if "cuda" not in missing:
        missing.append("cuda")  # a CPU tensor can never use the CUDA backend
    for name in missing:
        with pytest.raises(RuntimeError, match=rf"backend='{name}' cannot serve a weight on cpu: .+"):
            pk.projected_penalty(torch.randn(4, 4, 3, 3), backend=name)


def test_non_square_allowed_without_rotation():
    w = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(pk.project(w, "D1"), brute_force_project(w, "D1"))


def test_compiled_training_step(backend):
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(4, 8, 3, bias=False)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)

    @torch.compile(fullgraph=True)
    def loss_fn(x):
        out = conv(x)
        penalty = pk.projected_penalty(conv.weight, "C4", "regular", "regular", backend=backend)
        return out.square().mean() + penalty, penalty

    def step(x):
        loss, penalty = loss_fn(x)
        loss.backward()
        opt.step()
        return loss, penalty

    before = float(pk.projected_penalty(conv.weight.detach(), "C4", "regular", "regular"))
    for _ in range(3):
        opt.zero_grad()
        eager = pk.projected_penalty(conv.weight.detach(), "C4", "regular", "regular")
        loss, penalty = step(torch.randn(2, 4, 8, 8))
        torch.testing.assert_close(penalty.detach(), eager)
        assert conv.weight.grad is not None and torch.isfinite(loss)
    for _ in range(20):
        opt.zero_grad()
        pk.projected_penalty(conv.weight, "C4", "regular", "regular", backend=backend).backward()
        opt.step()
    assert float(pk.projected_penalty(conv.weight.detach(), "C4", "regular", "regular")) < 1e-3 * before
