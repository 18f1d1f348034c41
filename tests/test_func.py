"""torch.func over the public functions and model_penalty: grad, vjp, jvp (and torch.autograd.forward_ad),
vmap, double backward and functional_call, on the native ("cpp"), "reference" and "triton" backends, against the
eager values and the analytic derivatives (penalty' = 2 <W - P W, dW>, eq' = 2 <P W, dW>, P' = P)."""
import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vjp, vmap

import projkernels as pk
from projkernels.library import autograd, functional
from projkernels.model import Symmetry, attach_regular_gcnn, attach_symmetries, attached_layers, model_penalty
from projkernels.backends.reference import brute_force_project

# The batched-kernel spies below know the native and reference kernels; the other tests also run on
# Triton (its interpreter on CPU), whose transforms the API documents too.
SPIED_BACKENDS = ["cpp", "reference"]
BACKENDS = SPIED_BACKENDS + [b for b in ("triton",) if b in pk.available_backends("cpu")]
SPEC = ("C4", "regular", "regular")


def _w(shape=(8, 8, 3, 3), seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, *shape, generator=g, dtype=torch.float64)


def _pw(w, spec=SPEC):
    return brute_force_project(w, *spec)


# Each function as a map of one weight to a tensor, with its analytic directional derivative.
def _fns(backend, spec=SPEC):
    c = _w(seed=7)  # a fixed cotangent for project, so its scalar is not P-invariant by accident
    return {
        "projected_penalty": (lambda w: pk.projected_penalty(w, *spec, backend=backend),
                              lambda w, d: 2 * ((w - _pw(w, spec)) * d).sum()),
        "penalty_and_energy": (lambda w: torch.stack(pk.penalty_and_energy(w, *spec, backend=backend)),
                               lambda w, d: torch.stack([2 * ((w - _pw(w, spec)) * d).sum(),
                                                         2 * (_pw(w, spec) * d).sum()])),
        "project": (lambda w: pk.project(w, *spec, backend=backend), lambda w, d: _pw(d, spec)),
        "project_scalar": (lambda w: (pk.project(w, *spec, backend=backend) * c).sum(),
                           lambda w, d: (_pw(d, spec) * c).sum()),
    }


def _eager_grad(f, w):
    w = w.clone().requires_grad_(True)
    return torch.autograd.grad(f(w), [w])[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["projected_penalty", "project_scalar"])
def test_grad_matches_eager_and_analytic(backend, name):
    f, _ = _fns(backend)[name]
    w = _w()
    g = grad(f)(w)
    torch.testing.assert_close(g, _eager_grad(f, w))
    expected = 2 * (w - _pw(w)) if name == "projected_penalty" else _pw(_w(seed=7))
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["penalty_and_energy", "project"])
def test_vjp_matches_eager(backend, name):
    f, _ = _fns(backend)[name]
    w = _w()
    out, pull = vjp(f, w)
    torch.testing.assert_close(out, f(w))
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    ww = w.clone().requires_grad_(True)
    expected = torch.autograd.grad(f(ww), [ww], cot)[0]
    torch.testing.assert_close(pull(cot)[0], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["projected_penalty", "penalty_and_energy", "project"])
def test_jvp_matches_analytic_and_finite_difference(backend, name):
    f, deriv = _fns(backend)[name]
    w, d = _w(), _w(seed=1)
    out, tangent = jvp(f, (w,), (d,))
    torch.testing.assert_close(out, f(w))
    torch.testing.assert_close(tangent, deriv(w, d))
    eps = 1e-6  # central difference of a quadratic: exact up to rounding
    torch.testing.assert_close(tangent, (f(w + eps * d) - f(w - eps * d)) / (2 * eps), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_dual_tensors(backend):
    # torch.autograd.forward_ad: the tangent comes back (it used to be refused, and before that dropped).
    w, d = _w(), _w(seed=1)
    with fwAD.dual_level():
        dual = fwAD.make_dual(w, d)
        pen, eq = pk.penalty_and_energy(dual, *SPEC, backend=backend)
        pw = pk.project(dual, *SPEC, backend=backend)
        total = pk.multi_penalty([(dual, *SPEC), (w, *SPEC)], backend=backend)[0]
        tangents = [fwAD.unpack_dual(t).tangent for t in (pen, eq, pw, total)]
    torch.testing.assert_close(tangents[0], 2 * ((w - _pw(w)) * d).sum())
    torch.testing.assert_close(tangents[1], 2 * (_pw(w) * d).sum())
    torch.testing.assert_close(tangents[2], _pw(d))
    torch.testing.assert_close(tangents[3], tangents[0])  # the second item carries no tangent


class _Spy:
    """Counts the calls of a function that a test swaps in with monkeypatch."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)

    def __get__(self, obj, objtype=None):  # also as a method
        return self if obj is None else functools.partial(self, obj)


@pytest.fixture
def restore_reference():
    from projkernels.backends import BACKENDS, register_backend
    original = BACKENDS["reference"]
    yield
    register_backend(original)  # the registry's change hooks drop the configurations that held the spies


def _spy(monkeypatch, backend):
    # The batched kernels: the native multi-tensor ops, the reference's stack kernels (its orbit form
    # with a leading dim), each registered with the backend as its StackKernels.
    if backend == "cpp":
        import projkernels.backends.native as native
        spies = _Spy(native.multi_forward), _Spy(native.multi_backward)
        monkeypatch.setattr(native, "multi_forward", spies[0])
        monkeypatch.setattr(native, "multi_backward", spies[1])
    else:
        from dataclasses import replace
        from projkernels.backends import BACKENDS, StackKernels, register_backend
        original = BACKENDS["reference"]
        k = original.stack
        spies = _Spy(k.forward), _Spy(k.backward)
        register_backend(replace(original, stack=StackKernels(spies[0], spies[1], k.project)))  # restored by
        # the restore_reference fixture
    project_spy = _Spy(autograd.StackCalls.project)
    monkeypatch.setattr(autograd.StackCalls, "project", project_spy)
    return spies + (project_spy,)


@pytest.mark.parametrize("backend", SPIED_BACKENDS)
def test_vmap_is_one_kernel_call_and_matches_a_loop(backend, monkeypatch, restore_reference):
    fns = _fns(backend)
    wb = _w(batch=(5,))
    wb[2] = _pw(wb[2])  # one exactly equivariant entry: a fold that mixed entries would not keep it at 0
    fwd, bwd, proj = _spy(monkeypatch, backend)
    pe = vmap(fns["penalty_and_energy"][0])(wb)
    assert fwd.calls == 1
    pw = vmap(fns["project"][0])(wb)
    assert proj.calls == 1
    per_sample = vmap(grad(fns["projected_penalty"][0]))(wb)
    assert bwd.calls == 1
    for i in range(5):
        torch.testing.assert_close(pe[i], fns["penalty_and_energy"][0](wb[i]))
        torch.testing.assert_close(pw[i], fns["project"][0](wb[i]))
        torch.testing.assert_close(per_sample[i], _eager_grad(fns["projected_penalty"][0], wb[i]))
    assert pe[2, 0] < 1e-20 * pe[2, 1]
    # The batch dim elsewhere than in front, and a nested vmap (two batch dims folded into one call).
    moved = vmap(fns["projected_penalty"][0], in_dims=2)(wb.movedim(0, 2))
    torch.testing.assert_close(moved, pe[:, 0])
    nested = vmap(vmap(fns["project"][0]))(wb.reshape(5, 1, 8, 8, 3, 3).expand(5, 2, 8, 8, 3, 3))
    torch.testing.assert_close(nested, pw[:, None].expand(5, 2, 8, 8, 3, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_trivial_output_fields(backend):
    # trivial -> regular and regular -> trivial: every out channel its own field, then |G| of them.
    for spec, shape in ((("C4", "trivial", "regular"), (8, 2, 3, 3)), (("D4", "regular", "trivial"), (3, 8, 3, 3))):
        wb = _w(shape, batch=(3,))
        got = vmap(lambda w: torch.stack(pk.penalty_and_energy(w, *spec, backend=backend)))(wb)
        for i in range(3):
            torch.testing.assert_close(got[i], torch.stack(pk.penalty_and_energy(wb[i], *spec, backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_and_hessian(backend):
    # penalty = ||(I - P) W||^2 has Hessian 2 (I - P); eq_energy has 2 P.
    spec, shape = ("C4", "regular", "trivial"), (1, 4, 3, 3)
    w, v = _w(shape), _w(shape, seed=2)
    pen = lambda x: pk.projected_penalty(x, *spec, backend=backend)  # noqa: E731
    hvp = grad(lambda x: (grad(pen)(x) * v).sum())(w)
    torch.testing.assert_close(hvp, 2 * (v - _pw(v, spec)))
    n = w.numel()
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    p_matrix = torch.stack([_pw(e, spec).reshape(-1) for e in eye])
    h = hessian(pen)(w).reshape(n, n)
    torch.testing.assert_close(h, 2 * (torch.eye(n, dtype=torch.float64) - p_matrix))
    h_eq = jacrev(jacrev(lambda x: pk.penalty_and_energy(x, *spec, backend=backend)[1]))(w).reshape(n, n)
    torch.testing.assert_close(h_eq, 2 * p_matrix)


def _items(ws, backend_specs=(("C4", "regular", "regular"), ("D4", "trivial", "regular"), ("C4", "regular", "trivial"))):
    return [(w, *s) for w, s in zip(ws, backend_specs)]


def _multi_weights(seed=0, batch=()):
    return [_w((8, 8, 3, 3), seed, batch), _w((16, 2, 3, 3), seed + 1, batch), _w((3, 8, 5, 5), seed + 2, batch)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_penalty_grad_jvp_vmap(backend):
    ws = _multi_weights()

    def f(*xs):
        total, total_eq, pen, eq = pk.multi_penalty(_items(xs), backend=backend)
        return total + 0.5 * total_eq + (pen * torch.arange(1.0, 4.0, dtype=pen.dtype)).sum()

    grads = grad(f, argnums=(0, 1, 2))(*ws)
    leaves = [w.clone().requires_grad_(True) for w in ws]
    expected = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
    ds = _multi_weights(seed=10)
    _, tangent = jvp(f, tuple(ws), tuple(ds))
    specs = [i[1:] for i in _items(ws)]
    analytic = sum((1 + k) * 2 * ((w - _pw(w, s)) * d).sum() + 2 * ((w - _pw(w, s)) * d).sum() +
                   0.5 * 2 * (_pw(w, s) * d).sum() for k, (w, d, s) in enumerate(zip(ws, ds, specs)))
    torch.testing.assert_close(tangent, analytic)
    wbs = _multi_weights(seed=20, batch=(4,))
    batched = vmap(lambda *xs: pk.multi_penalty(_items(xs), backend=backend)[2])(*wbs)
    for i in range(4):
        torch.testing.assert_close(batched[i], pk.multi_penalty(_items([w[i] for w in wbs]), backend=backend)[2])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x):
        return self.body(x)


class _WithPenalty(nn.Module):
    """A training loss that includes model_penalty, so that functional_call swaps the parameters for both."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).square().mean() + model_penalty(self.net, 1.0, 0.25)


def _net(backend):
    torch.manual_seed(0)
    net = _Net().double()
    if backend == "cpp":
        attach_regular_gcnn(net, "C4", last_out="trivial")
    else:
        layers = ("body.0", "body.2", "body.4")
        reps = {"body.0": ("trivial", "regular"), "body.2": ("regular", "regular"), "body.4": ("regular", "trivial")}
        attach_symmetries(net, lambda name, m: Symmetry("C4", *reps[name], backend=backend) if name in layers else None)
    return net


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_grad_of_model_penalty(backend):
    net = _net(backend)
    loss = _WithPenalty(net)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in loss.named_parameters()}
    grads = grad(lambda p: functional_call(loss, p, (x,)))(params)
    # Eager: the same parameters loaded into the model.
    with torch.no_grad():
        for k, v in loss.named_parameters():
            v.copy_(params[k])
    value = loss(x)
    expected = torch.autograd.grad(value, list(loss.parameters()))
    for (k, _), e in zip(loss.named_parameters(), expected):
        torch.testing.assert_close(grads[k], e, msg=k)
    # The penalty term alone: 2 (W - P W) on the middle weight.
    w = params["net.body.2.weight"]
    only = grad(lambda p: _penalty_with(net, p))({"body.2.weight": w})["body.2.weight"]
    torch.testing.assert_close(only, 2 * (w - _pw(w)))


def _penalty_with(net, p):
    # model_penalty with some parameters swapped in (functional_call on a module whose forward is the penalty).
    class Pen(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self):
            return model_penalty(self.inner, bias=False)
    return functional_call(Pen(net), {"inner." + k: v for k, v in p.items()}, ())


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_an_ensemble_of_parameters(backend):
    net = _net(backend)
    params = {k: v.detach() for k, v in net.named_parameters()}
    stacked = {k: torch.stack([v + 0.1 * i * torch.ones_like(v) for i in range(3)]) for k, v in params.items()}
    got = vmap(lambda p: _penalty_with(net, p))(stacked)
    for i in range(3):
        torch.testing.assert_close(got[i], _penalty_with(net, {k: v[i] for k, v in stacked.items()}))


def _brute_model_penalty(net, params, lambda_perp, lambda_G):
    """model_penalty of ``net`` with ``params`` swapped in, from the brute-force group average, and its
    gradient by parameter name: weights lambda_perp ||W - P W||^2 + lambda_G ||P W||^2 (gradient
    2 lambda_perp (W - P W) + 2 lambda_G P W), regular-field biases lambda_perp ||b - field means||^2
    (gradient 2 lambda_perp (b - field means)); other biases are not penalised (gradient 0)."""
    total = torch.zeros((), dtype=torch.float64)
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    for name, _, s in attached_layers(net):
        w = params[f"{name}.weight"]
        pw = _pw(w, (s.group, s.in_rep, s.out_rep))
        total = total + lambda_perp * (w - pw).square().sum() + lambda_G * pw.square().sum()
        grads[f"{name}.weight"] = 2 * lambda_perp * (w - pw) + 2 * lambda_G * pw
        b = params.get(f"{name}.bias")
        if b is not None and s.out_rep == "regular":
            dev = b.view(-1, 4) - b.view(-1, 4).mean(1, keepdim=True)
            total = total + lambda_perp * dev.square().sum()
            grads[f"{name}.bias"] = 2 * lambda_perp * dev.reshape(b.shape)
    return total, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_and_vjp_of_model_penalty_through_functional_call(backend):
    # Forward mode through model_penalty (weights and regular-field biases, lambda_G included), and vjp
    # with a cotangent other than 1, against the brute-force penalty's analytic derivatives and the
    # eager call on the same parameters.
    net = _net(backend)

    class Pen(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self):
            return model_penalty(self.inner, 1.3, 0.4)

    pen = Pen(net)
    gen = torch.Generator().manual_seed(12)
    params = {k: v.detach() + 0.1 * torch.randn(v.shape, dtype=v.dtype, generator=gen)
              for k, v in net.named_parameters()}
    dirs = {k: torch.randn(v.shape, dtype=v.dtype, generator=gen) for k, v in params.items()}
    keys = list(params)
    value, grads = _brute_model_penalty(net, params, 1.3, 0.4)
    assert any(k.endswith(".bias") and bool(grads[k].any()) for k in keys)  # a penalised bias among them

    def f(*ps):
        return functional_call(pen, {"inner." + k: v for k, v in zip(keys, ps)}, ())

    primals, tangents = tuple(params[k] for k in keys), tuple(dirs[k] for k in keys)
    out, tangent = jvp(f, primals, tangents)
    torch.testing.assert_close(out, value)
    torch.testing.assert_close(tangent, sum((grads[k] * dirs[k]).sum() for k in keys))
    eager = [v.clone().requires_grad_(True) for v in primals]
    eager_out = f(*eager)
    torch.testing.assert_close(out, eager_out.detach())
    with fwAD.dual_level():  # forward-mode AD without torch.func: the same tangent
        dual = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, tangent)
    out, pull = vjp(f, *primals)
    got = pull(torch.tensor(-0.7, dtype=out.dtype))
    want = [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(eager_out, eager, allow_unused=True), eager)]
    for k, a, b in zip(keys, got, want):
        torch.testing.assert_close(a, -0.7 * b, msg=k)
        torch.testing.assert_close(a, -0.7 * grads[k], msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vjp_of_multi_penalty_matches_eager(backend):
    ws = _multi_weights(seed=30)

    def f(*xs):
        return torch.stack(pk.multi_penalty(_items(xs), backend=backend)[2:])  # [2, layers]: pen, eq

    out, pull = vjp(f, *ws)
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(31))
    leaves = [w.clone().requires_grad_(True) for w in ws]
    eager = f(*leaves)
    torch.testing.assert_close(out, eager.detach())
    for a, b in zip(pull(cot), torch.autograd.grad(eager, leaves, cot)):
        torch.testing.assert_close(a, b)
    # and the analytic rule: cot_pen 2 (W - P W) + cot_eq 2 P W per layer
    for i, (a, (w, *spec)) in enumerate(zip(pull(cot), _items(ws))):
        pw = _pw(w, tuple(spec))
        torch.testing.assert_close(a, 2 * cot[0, i] * (w - pw) + 2 * cot[1, i] * pw)


def test_steerable_symmetry_under_a_transform_says_what_is_supported():
    pytest.importorskip("escnn")
    from escnn import gspaces, nn as enn
    gs = gspaces.rot2dOnR2(4)
    field = enn.FieldType(gs, [gs.regular_repr])
    sym = pk.steerable(field, field, 3)
    w = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match="steerable symmetry"):
        grad(lambda x: pk.projected_penalty(x, sym))(w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_of_a_nearly_equivariant_half_weight_uses_the_kernels_deviations(backend, dtype):
    # An equivariant half weight with every 7th entry one step of 2^-7 off: W - round(P W) would
    # drown these deviations in the rounding of P W (the sign of the tangent came out wrong).
    w = _pw(_w()).to(dtype)
    w.view(-1)[::7] *= 1 + 2 ** -7
    d = _w(seed=6).to(dtype)
    expected = 2 * ((w.double() - _pw(w.double())) * d.double()).sum()
    _, t = jvp(lambda x: pk.projected_penalty(x, *SPEC, backend=backend), (w,), (d,))
    assert t.dtype == torch.float32
    torch.testing.assert_close(t.double(), expected, rtol=1e-3, atol=0)
    # The same coefficient as a gradient: d/dg_p <vjp(g_p), d> = 2 <W - P W, d>.
    _, vjp_fn = vjp(lambda x: pk.projected_penalty(x, *SPEC, backend=backend), w)
    g = grad(lambda gp: (vjp_fn(gp)[0].to(torch.float32) * d.float()).sum())(torch.ones((), dtype=torch.float32))
    torch.testing.assert_close(g.double(), expected, rtol=1e-2, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_of_a_nearly_equivariant_float32_weight_keeps_its_relative_precision(backend):
    # 2 <W - P W, dW> from the kernel's deviations: a difference of energies would lose every digit here.
    w = (_pw(_w()) + 1e-5 * _w(seed=5)).float()
    d = (_pw(_w(seed=6)) + _w(seed=8)).float()
    expected = 2 * ((w.double() - _pw(w.double())) * d.double()).sum()
    _, t = jvp(lambda x: pk.projected_penalty(x, *SPEC, backend=backend), (w,), (d,))
    assert t.dtype == torch.float32
    # float32 orbit means leave ~1e-3 relative on deviations of 1e-5; 2 <W, dW> - 2 <P W, dW> in float32
    # is off by ~3e-2 on this weight.
    torch.testing.assert_close(t.double(), expected, rtol=1e-2, atol=0)
    with fwAD.dual_level():
        pen = pk.projected_penalty(fwAD.make_dual(w, d), *SPEC, backend=backend)
        torch.testing.assert_close(fwAD.unpack_dual(pen).tangent, t)
