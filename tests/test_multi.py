"""multi_penalty against the sum of single-layer results."""
import os
from types import SimpleNamespace

import pytest
import torch

import projkernels as pk
from projkernels.backends import BACKENDS, register_backend, unregister_backend
from projkernels.dispatch.multi import MultiBackend, multi_penalty, multi_table, register_multi_backend
from projkernels.backends.reference import brute_force_project

# A mixed model: several groups (two of order 4, of orders 8 and 3), reps, kernel sizes, ranks.
SPECS = [
    ((16, 3, 3, 3), "C4", "trivial", "regular"),
    ((16, 16, 3, 3), "C4", "regular", "regular"),
    ((16, 16, 3, 3), "C4", "regular", "regular"),   # same shape as its neighbour, different weights
    ((8, 16, 5, 5), "D2", "regular", "regular"),
    ((16, 16, 3, 3), "D4", "regular", "regular"),
    ((5, 16, 1, 1), "D4", "regular", "trivial"),
    ((6, 9), "C3", "regular", "trivial"),
    ((4, 6, 4, 4), "C4", "trivial", "trivial"),
    ((4, 2, 5), "D1", "trivial", "regular"),
]


def _weights(dtypes, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for (shape, *_), dt in zip(SPECS, dtypes):
        out.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dt).requires_grad_(requires_grad))
    return out


def _single(ws, backend="reference"):
    pairs = [pk.penalty_and_energy(w, *s[1:], backend=backend) for w, s in zip(ws, SPECS)]
    return torch.stack([p for p, _ in pairs]), torch.stack([e for _, e in pairs])


# "reference" is the concatenated route; "cpp" the fused multi-tensor kernel.
CPU_BACKENDS = [b for b in pk.available_backends("cpu") if b != "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_values_and_grads_match_single_layers(dtype, backend):
    ws = _weights([dtype] * len(SPECS))
    tp, te, pp, pe = multi_penalty([(w, *s[1:]) for w, s in zip(ws, SPECS)], backend=backend)
    sp, se = _single(ws)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert tp.dtype == te.dtype == pp.dtype == pe.dtype == acc
    assert pp.shape == pe.shape == (len(SPECS),)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(pp, sp.to(acc), rtol=rtol, atol=0)
    torch.testing.assert_close(pe, se.to(acc), rtol=rtol, atol=0)
    torch.testing.assert_close(tp, sp.sum().to(acc), rtol=rtol, atol=0)
    torch.testing.assert_close(te, se.sum().to(acc), rtol=rtol, atol=0)

    # Weights on totals and per-layer entries together: layer l sees gp = a + c_l, ge = b + d_l.
    c = torch.linspace(0.5, 2.0, len(SPECS), dtype=acc)
    d = torch.linspace(-1.0, 1.0, len(SPECS), dtype=acc)
    loss = 0.7 * tp + 0.3 * te + (c * pp).sum() + (d * pe).sum()
    grads = torch.autograd.grad(loss, ws)
    loss_single = ((0.7 + c) * sp.to(acc)).sum() + ((0.3 + d) * se.to(acc)).sum()
    expected = torch.autograd.grad(loss_single, ws)
    for g, e, w in zip(grads, expected, ws):
        assert g.dtype == w.dtype and g.shape == w.shape
        tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(
            dtype, dict(rtol=2e-2, atol=2e-2))
        torch.testing.assert_close(g.double(), e.double(), **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_promote_and_return_each_grad_in_its_dtype(backend):
    dtypes = [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, torch.float16, torch.float32,
              torch.bfloat16, torch.float32, torch.float32]
    ws = _weights(dtypes)
    tp, te, pp, pe = multi_penalty([(w, *s[1:]) for w, s in zip(ws, SPECS)], backend=backend)
    assert pp.dtype == torch.float32
    sp, se = _single(ws)
    torch.testing.assert_close(pp, sp, rtol=1e-5, atol=0)
    # The penalty's and the energy's gradients each on its own (their sum is 2 W whatever P is).
    g_pen = torch.autograd.grad(tp, ws, retain_graph=True)
    g_eq = torch.autograd.grad(te, ws)
    for a, b, w, s in zip(g_pen, g_eq, ws, SPECS):
        assert a.dtype == b.dtype == w.dtype
        p = brute_force_project(w.detach().double(), *s[1:])
        torch.testing.assert_close(a.double(), 2 * (w.detach().double() - p), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(b.double(), 2 * p, rtol=1e-2, atol=1e-2)


GRADCHECK_SPECS = [
    ((4, 1, 3, 3), "C4", "trivial", "regular"),
    ((4, 4, 3, 3), "C4", "regular", "regular"),
    ((1, 4, 3, 3), "D2", "regular", "trivial"),
    ((8, 8, 1, 1), "D4", "regular", "regular"),
    ((3, 3), "C3", "regular", "regular"),
    ((2, 1, 5), "D1", "trivial", "regular"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_gradcheck(backend):
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(s[0], generator=g, dtype=torch.float64, requires_grad=True) for s in GRADCHECK_SPECS]
    scale = torch.arange(1.0, len(GRADCHECK_SPECS) + 1, dtype=torch.float64)

    def f(*weights):
        tp, te, pp, pe = multi_penalty([(w, *s[1:]) for w, s in zip(weights, GRADCHECK_SPECS)], backend=backend)
        return tp + 0.5 * te + (pp * scale).sum(), pe

    assert torch.autograd.gradcheck(f, ws)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_is_the_projection_formula(backend):
    ws = _weights([torch.float64] * len(SPECS), seed=5)
    tp, te, _, _ = multi_penalty([(w, *s[1:]) for w, s in zip(ws, SPECS)], backend=backend)
    gp = torch.autograd.grad(tp, ws, retain_graph=True)
    ge = torch.autograd.grad(te, ws)
    for w, s, a, b in zip(ws, SPECS, gp, ge):
        p = brute_force_project(w, *s[1:])
        torch.testing.assert_close(a, 2 * (w.detach() - p), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, 2 * p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nearly_equivariant_weights_keep_relative_accuracy(backend):
    ws = _weights([torch.float64] * len(SPECS), seed=7, requires_grad=False)
    g = torch.Generator().manual_seed(8)
    near = [(brute_force_project(w, *s[1:]) + 1e-4 * torch.randn(w.shape, generator=g, dtype=torch.float64)).float()
            for w, s in zip(ws, SPECS)]
    _, _, pp, _ = multi_penalty([(w, *s[1:]) for w, s in zip(near, SPECS)], backend=backend)
    exact = torch.stack([((w.double() - pk.project(w.double(), *s[1:], backend="reference")) ** 2).sum()
                         for w, s in zip(near, SPECS)])
    nonzero = exact > 0
    torch.testing.assert_close(pp[nonzero].double(), exact[nonzero], rtol=1e-4, atol=0)


def test_items_as_objects_non_contiguous_and_group_objects():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 32, 3, 3, generator=g, dtype=torch.float64)
    strided = base[:, ::2]                      # non-contiguous view, (16, 16, 3, 3)
    transposed = torch.randn(32, 8, generator=g, dtype=torch.float64).t()   # (8, 32), non-contiguous
    items = [SimpleNamespace(weight=strided, group=pk.get_group("C4"), in_rep="regular", out_rep="regular"),
             SimpleNamespace(weight=transposed, group="D4", in_rep="regular", out_rep="trivial")]
    _, _, pp, pe = multi_penalty(items)
    for item, p, e in zip(items, pp, pe):
        sp, se = pk.penalty_and_energy(item.weight.contiguous(), item.group, item.in_rep, item.out_rep)
        torch.testing.assert_close(p, sp, rtol=1e-12, atol=0)
        torch.testing.assert_close(e, se, rtol=1e-12, atol=0)


def test_table_is_cached_and_one_gather_per_group_order():
    key = [(s[0], s[1], s[2], s[3]) for s in SPECS]
    t1, t2 = multi_table(key), multi_table(list(key))
    assert t1 is t2
    assert [b.order for b in t1.buckets] == [2, 3, 4, 8]
    assert sum(b.index.shape[0] for b in t1.buckets) == sum(
        pk.orbit_table(*k).n_orbits for k in key)
    # Every entry of the buffer is covered by some orbit.
    covered = torch.zeros(t1.numel, dtype=torch.bool)
    for b in t1.buckets:
        covered[b.index.reshape(-1)] = True
    assert covered.all()


def test_registered_multi_backend_is_used_by_auto():
    calls = []
    ref = BACKENDS["reference"].multi

    def fwd(buffer, table):
        calls.append("forward")
        return ref.forward(buffer, table)

    def bwd(buffer, table, gp, ge):
        calls.append("backward")
        return ref.backward(buffer, table, gp, ge)

    saved = BACKENDS.get("cpp")
    register_multi_backend(MultiBackend("cpp", fwd, bwd, lambda device: None))
    try:
        ws = _weights([torch.float64] * len(SPECS))
        tp, *_ = multi_penalty([(w, *s[1:]) for w, s in zip(ws, SPECS)], backend="auto")
        tp.backward()
    finally:
        if saved is None:
            unregister_backend("cpp")
        else:
            register_backend(saved)
    assert calls == ["forward", "backward"]


@pytest.mark.parametrize("backend", pk.available_backends("cpu"))
def test_every_available_backend_agrees(backend):
    if backend == "triton" and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    ws = _weights([torch.float32] * len(SPECS), seed=11)
    tp, te, pp, pe = multi_penalty([(w, *s[1:]) for w, s in zip(ws, SPECS)], backend=backend)
    sp, se = _single(ws)
    torch.testing.assert_close(pp, sp, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pe, se, rtol=1e-4, atol=1e-6)
    grads = torch.autograd.grad(tp + 0.5 * te, ws)
    expected = torch.autograd.grad(sp.sum() + 0.5 * se.sum(), ws)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_input_names_the_item():
    w = torch.randn(6, 8, 3, 3)
    with pytest.raises(ValueError, match=r"items\[1\].*dim 0"):
        multi_penalty([(torch.randn(4, 4, 3, 3), "C4", "regular", "regular"), (w, "C4", "regular", "regular")])
    with pytest.raises(ValueError, match=r"items\[0\].*C8"):
        multi_penalty([(torch.randn(8, 8, 3, 3), "C8", "regular", "regular")])
    with pytest.raises(TypeError, match=r"items\[0\].*floating"):
        multi_penalty([(torch.ones(4, 4, 3, 3, dtype=torch.int64), "C4", "regular", "regular")])
    with pytest.raises(TypeError, match=r"items\[0\]"):
        multi_penalty([object()])
    with pytest.raises(ValueError, match=r"items\[0\]"):
        multi_penalty([(w, "C4")])
    with pytest.raises(ValueError, match="backend"):
        multi_penalty([(torch.randn(4, 4), "C4", "regular", "regular")], backend="nope")


def test_empty_list_is_zero():
    tp, te, pp, pe = multi_penalty([])
    assert tp.item() == 0 and te.item() == 0 and pp.numel() == 0 and pe.numel() == 0
