"""The native hot path: the public C++ ops, their C++ autograd, the validate-once caches and
torch.compile / CUDA graph use of the public API."""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch import nn

import projkernels as pk
import projkernels.backends.reference as R
from projkernels import model as model_mod
from projkernels.dispatch import config
from projkernels.orbits import orbit_table

C = pytest.importorskip("projkernels.backends.native", reason="projkernels._C is not built")
from projkernels import _C  # noqa: E402  (built, since projkernels.backends.native imported)
OPS = torch.ops.projkernels_C

SPECS = [((8, 4, 3, 3), "D4", "trivial", "regular"), ((8, 8, 3, 3), "C4", "regular", "regular"),
         ((4, 4, 5), "C2", "trivial", "trivial"), ((16, 8), "D4", "regular", "regular")]


def _weight(shape, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def _single_args(w, group, in_rep, out_rep):
    t = orbit_table(tuple(w.shape), group, in_rep, out_rep)
    return list(t.device_tables(w.device, w.dtype)), t.geometry


def _multi_args(ws, specs):
    plan = pk.dispatch.multi.plan_for(pk.dispatch.multi_inputs.collect([(w, *s[1:]) for w, s in zip(ws, specs)])[1], "cpp")
    a = plan.call
    return a.offsets, a.inv_stab, a.consts, a.geometry


# --- opcheck of every op ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS[:2])
def test_opcheck_public_single_weight_ops(dtype, spec):
    w = _weight(spec[0], dtype, requires_grad=dtype == torch.float64)
    table, geometry = _single_args(w, *spec[1:])
    acc = R.acc_dtype(dtype)
    gp, ge = torch.tensor(0.75, dtype=acc), torch.tensor(-0.5, dtype=acc)
    torch.library.opcheck(OPS.penalty_energy.default, (w, table, geometry))
    torch.library.opcheck(OPS.penalty_energy_backward.default, (w, gp, ge, table, geometry))
    torch.library.opcheck(OPS.project.default, (w, table, geometry))
    torch.library.opcheck(OPS.spectrum.default, (w.detach(), table, geometry))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_public_multi_ops(dtype):
    ws = [_weight(s[0], dtype, seed=i, requires_grad=dtype == torch.float64) for i, s in enumerate(SPECS)]
    offsets, inv_stab, consts, geometry = _multi_args(ws, SPECS)
    acc = R.acc_dtype(dtype)
    gp, ge = torch.linspace(0.5, 1.5, len(ws), dtype=acc), torch.linspace(-1, 1, len(ws), dtype=acc)
    torch.library.opcheck(OPS.multi_penalty.default, (ws, offsets, inv_stab, consts, geometry))
    torch.library.opcheck(OPS.multi_penalty_backward.default, (ws, gp, ge, offsets, inv_stab, consts, geometry))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_opcheck_raw_ops(dtype):
    w = _weight((8, 4, 3, 3), dtype)
    t = orbit_table(tuple(w.shape), "D4", "trivial", "regular")
    d = t.device_tables(w.device, w.dtype)
    g = t.geometry
    torch.library.opcheck(OPS.fused_forward.default, (w, d.offsets, d.inv_stab, d.basis, d.row_irrep, *g))
    torch.library.opcheck(OPS.fused_backward.default, (w, d.half, d.zero, d.offsets, d.inv_stab, *g[1:]))
    ws = [w, _weight((8, 8, 3, 3), dtype, seed=1)]
    offsets, inv_stab, _, geometry = _multi_args(ws, [((8, 4, 3, 3), "D4", "trivial", "regular"), SPECS[1]])
    acc = R.acc_dtype(dtype)
    torch.library.opcheck(OPS.multi_forward.default, (ws, offsets, inv_stab, geometry))
    torch.library.opcheck(OPS.multi_backward.default,
                          (ws, torch.ones(2, dtype=acc), torch.zeros(2, dtype=acc), offsets, inv_stab, geometry))
    assert OPS.cuda_enabled() is C.WITH_CUDA


def test_public_ops_agree_with_the_reference():
    for i, (shape, *spec) in enumerate(SPECS):
        w = _weight(shape, seed=i)
        table, geometry = _single_args(w, *spec)
        t = orbit_table(shape, *spec)
        pen, eq = OPS.penalty_energy(w, table, geometry)
        rp, re_ = R.forward(w, t)
        torch.testing.assert_close(pen, rp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eq, re_, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(OPS.project(w, table, geometry), R.brute_force_project(w, *spec))
        torch.testing.assert_close(OPS.spectrum(w, table, geometry), R.spectral_spectrum(w, t))
        gp, ge = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-1.7, dtype=torch.float64)
        torch.testing.assert_close(OPS.penalty_energy_backward(w, gp, ge, table, geometry), R.backward(w, t, gp, ge))


def test_public_op_checks_its_argument_counts():
    w = _weight((8, 8, 3, 3))
    table, geometry = _single_args(w, "C4", "regular", "regular")
    with pytest.raises(RuntimeError, match=r"table must be \[offsets, inv_stab, basis, row_irrep, zero, half\]"):
        OPS.penalty_energy(w, table[:4], geometry)
    with pytest.raises(RuntimeError, match="geometry must be"):
        OPS.project(w, table, geometry[1:])
    with pytest.raises(RuntimeError, match="weight has 288 entries"):
        OPS.penalty_energy(w[:4], table, geometry)


# --- bound calls (csrc/python/python_calls.cpp): what the eager API calls --------------------------------

def _log_ops(log):
    class Log(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            log.append(func)
            return func(*args, **(kwargs or {}))
    return Log()


class _Traced(torch.Tensor):
    """A subclass whose __torch_function__ override records what reaches it."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("spec", SPECS)
def test_bound_calls_equal_the_ops_they_bind(spec):
    w = nn.Parameter(_weight(spec[0], torch.float32))
    table, geometry = _single_args(w, *spec[1:])
    bound = _C.SingleCall("penalty_energy", "project", "spectrum", table, geometry)
    pen, eq = bound.penalty_energy(w)
    rp, re_ = OPS.penalty_energy(w, table, geometry)
    assert torch.equal(pen, rp) and torch.equal(eq, re_) and "PenaltyEnergyFn" in pen.grad_fn.name()
    (g,) = torch.autograd.grad(pen + 0.5 * eq, [w])
    (rg,) = torch.autograd.grad(rp + 0.5 * re_, [w])
    assert torch.equal(g, rg)
    assert torch.equal(bound.project(w), OPS.project(w, table, geometry))
    assert torch.equal(bound.spectrum(w.detach()), OPS.spectrum(w.detach(), table, geometry))
    assert bound.geometry == list(geometry) and len(bound.table) == len(table)


def test_bound_multi_call_equals_the_op_it_binds():
    ws = [nn.Parameter(_weight(s[0], torch.float32, seed=i)) for i, s in enumerate(SPECS)]
    offsets, inv_stab, consts, geometry = _multi_args(ws, SPECS)
    bound = _C.MultiCall(offsets, inv_stab, consts, geometry)
    out, ref = bound(ws), OPS.multi_penalty(ws, offsets, inv_stab, consts, geometry)
    assert all(torch.equal(a, b) for a, b in zip(out, ref)) and "MultiPenaltyFn" in out[0].grad_fn.name()
    grads = torch.autograd.grad(out[0] + out[1], ws)
    ref_grads = torch.autograd.grad(ref[0] + ref[1], ws)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert bound(tuple(ws))[0].item() == out[0].item()  # any sequence of weights


def test_api_calls_honour_torch_function_overrides():
    # The bound calls skip torch.ops' argument handling; a weight subclass with its own
    # __torch_function__, or an active TorchFunctionMode, must still see the op, as with any torch op.
    w = _weight((8, 8, 3, 3), torch.float32)
    plain = pk.projected_penalty(w, "C4", "regular", "regular")
    log = []
    with _log_ops(log):
        under_mode = pk.projected_penalty(w, "C4", "regular", "regular")
        pk.project(w, "C4", "regular", "regular")
        pk.multi_penalty([(w, "C4", "regular", "regular"), (w, "C4", "regular", "regular")])
    assert OPS.penalty_energy.default in log and OPS.project.default in log and OPS.multi_penalty.default in log
    assert torch.equal(under_mode, plain)
    _Traced.seen.clear()
    sub = pk.projected_penalty(w.as_subclass(_Traced), "C4", "regular", "regular")
    assert OPS.penalty_energy.default in _Traced.seen and type(sub) is _Traced and torch.equal(sub, plain)
    _Traced.seen.clear()
    pk.multi_penalty([(w, "C4", "regular", "regular"), (w.as_subclass(_Traced), "C4", "regular", "regular")])
    assert OPS.multi_penalty.default in _Traced.seen
    # A plain tensor or nn.Parameter takes the bound call: the mode above sees nothing here.
    log.clear()
    pk.projected_penalty(nn.Parameter(w), "C4", "regular", "regular")
    assert log == []


def test_bound_calls_are_their_own_copies():
    # Immutable: copying a configuration or a plan shares them (pybind objects cannot be pickled).
    import copy
    w = _weight((8, 8, 3, 3), torch.float32)
    cfg = config.config_for(w, "C4", "regular", "regular", "cpp")
    assert copy.deepcopy(cfg).ops.penalty_energy.__self__ is cfg.ops.penalty_energy.__self__
    plan = pk.dispatch.multi.plan_for(pk.dispatch.multi_inputs.collect([(w, "C4", "regular", "regular")])[1], "cpp")
    call = plan.call
    assert copy.copy(call) is call and copy.deepcopy(plan).call is call


def test_forward_mode_ad_is_refused_by_the_ops_not_dropped():
    # The C++ ops implement reverse mode only; a dual weight used to come back without its tangent.  The
    # public functions carry the tangent through projkernels/library/functional.py (tests/test_func.py).
    import torch.autograd.forward_ad as fwAD
    w = _weight((8, 8, 3, 3), torch.float64)
    table = orbit_table(w, "C4", "regular", "regular")
    with fwAD.dual_level():
        dual = fwAD.make_dual(w, torch.ones_like(w))
        with pytest.raises(RuntimeError, match="forward-mode tangent"):
            C.forward(dual, table)
        with pytest.raises(RuntimeError, match="forward-mode tangent"):
            C.project(dual, table)
        tangent = fwAD.unpack_dual(pk.projected_penalty(dual, "C4", "regular", "regular")).tangent
    torch.testing.assert_close(tangent, 2 * (w - pk.project(w, "C4", "regular", "regular")).sum())


def test_bound_calls_from_several_threads():
    # A bound call releases the GIL while its op runs (as torch's own bindings do): threads calling
    # at once get the results of serial calls.
    import threading
    ws = [_weight((32, 32, 3, 3), torch.float32, seed=i, requires_grad=True) for i in range(4)]
    serial = [torch.autograd.grad(pk.projected_penalty(w, "D4", "regular", "regular"), [w])[0] for w in ws]
    results = [None] * len(ws)

    def work(i):
        for _ in range(20):
            pen = pk.projected_penalty(ws[i], "D4", "regular", "regular")
            results[i] = torch.autograd.grad(pen, [ws[i]])[0]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ws))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(results, serial))


# --- C++ autograd ---------------------------------------------------------------------------------

def test_autograd_is_the_cpp_node():
    w = _weight((8, 8, 3, 3), torch.float32, requires_grad=True)
    pen = pk.projected_penalty(w, "C4", "regular", "regular")
    assert "PenaltyEnergyFn" in pen.grad_fn.name()
    assert "ProjectFn" in pk.project(w, "C4", "regular", "regular").grad_fn.name()
    tp = pk.multi_penalty([(w, "C4", "regular", "regular")])[0]
    assert "MultiPenaltyFn" in tp.grad_fn.name()
    assert not pk.spectrum(w, "C4", "regular", "regular").requires_grad
    with torch.no_grad():
        assert pk.projected_penalty(w, "C4", "regular", "regular").grad_fn is None


@pytest.mark.parametrize("spec", SPECS)
def test_gradcheck_and_gradgradcheck_single(spec):
    w = _weight(spec[0], requires_grad=True)
    f = lambda x: pk.penalty_and_energy(x, *spec[1:], backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))
    p = lambda x: pk.project(x, *spec[1:], backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(p, (w,))
    assert torch.autograd.gradgradcheck(p, (w,))


def test_gradcheck_and_gradgradcheck_multi():
    ws = tuple(_weight(s[0], seed=i, requires_grad=True) for i, s in enumerate(SPECS))
    f = lambda *x: pk.multi_penalty([(w, *s[1:]) for w, s in zip(x, SPECS)], backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(f, ws)
    assert torch.autograd.gradgradcheck(f, ws)


def test_double_backward_values():
    # d/dW of <dW/dW-form, v>: with penalty only, dW = 2 (W - P W), so the Hessian-vector product is
    # 2 (v - P v), independent of W.
    w = _weight((8, 8, 3, 3), requires_grad=True)
    v = _weight((8, 8, 3, 3), seed=3)
    (g,) = torch.autograd.grad(pk.projected_penalty(w, "C4", "regular", "regular"), [w], create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), [w])
    torch.testing.assert_close(hv, 2 * (v - R.brute_force_project(v, "C4", "regular", "regular")))


# --- validate once, and nothing else on the hot path ------------------------------------------------

def test_a_cache_hit_validates_and_builds_nothing(monkeypatch):
    w = _weight((8, 8, 3, 3), torch.float32, requires_grad=True)
    pk.projected_penalty(w, "D4", "regular", "regular")  # builds the configuration

    def fail(*a, **k):
        raise AssertionError("validated or built again on a cache hit")
    from projkernels.symmetry import finite
    monkeypatch.setattr(finite, "orbit_table", fail)
    monkeypatch.setattr(finite, "check_weight", fail)
    monkeypatch.setattr(config, "resolve", fail)
    monkeypatch.setattr(type(orbit_table((8, 8, 3, 3), "D4", "regular", "regular")), "device_tables", fail)
    for _ in range(2):
        torch.autograd.grad(pk.projected_penalty(w, "D4", "regular", "regular"), [w])
    # A new shape is a miss, which is where validation happens.
    with pytest.raises(AssertionError, match="validated or built again"):
        pk.projected_penalty(_weight((16, 8, 3, 3), torch.float32), "D4", "regular", "regular")


def _aten_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


STRAY = ("aten::zeros", "aten::zeros_like", "aten::fill_", "aten::to", "aten::_to_copy", "aten::copy_",
         "aten::item", "aten::_local_scalar_dense", "aten::aminmax", "aten::scalar_tensor", "aten::full")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_stray_ops_around_the_kernels(dtype):
    w = _weight((8, 8, 3, 3), dtype, requires_grad=True)
    ws = [_weight((8, 8, 3, 3), dtype, seed=i, requires_grad=True) for i in range(3)]
    items = [(x, "C4", "regular", "regular") for x in ws]
    torch.autograd.grad(pk.projected_penalty(w, "C4", "regular", "regular"), [w])
    torch.autograd.grad(pk.multi_penalty(items)[0], ws)

    one = torch.ones((), dtype=torch.float32)  # the engine's own ones_like + fill_ kept out of the count

    def single():
        pen, eq = pk.penalty_and_energy(w, "C4", "regular", "regular")
        torch.autograd.grad(pen, [w], grad_outputs=one)

    names = _aten_ops(single)
    assert "projkernels_C::fused_forward" in names and "projkernels_C::fused_backward" in names
    assert not [n for n in names if n in STRAY], names
    names = _aten_ops(lambda: torch.autograd.grad(pk.multi_penalty(items)[0], ws, grad_outputs=one))
    assert "projkernels_C::multi_forward" in names and "projkernels_C::multi_backward" in names
    assert not [n for n in names if n in STRAY], names


# --- model_penalty's cached plan ------------------------------------------------------------------

def _model(dtype=torch.float64):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 8, 1, bias=False))
    pk.attach_regular_gcnn(m, "C4", last_out="regular")
    return m.to(dtype)


def _expected(m, bias=True):
    total = torch.zeros((), dtype=torch.float64)
    for _, layer, s in pk.attached_layers(m):
        w = layer.weight.detach().double().cpu()
        total = total + (w - R.brute_force_project(w, s.group, s.in_rep, s.out_rep)).square().sum()
        if bias and layer.bias is not None and s.out_rep == "regular":
            b = layer.bias.detach().double().cpu().view(-1, 4)
            total = total + (b - b.mean(dim=1, keepdim=True)).square().sum()
    return total


def test_model_plan_is_reused_on_an_unchanged_model(monkeypatch):
    m = _model()
    first = pk.model_penalty(m)
    plan = model_mod._MODEL_PLANS[m]

    def fail(*a, **k):
        raise AssertionError("rebuilt on an unchanged model")
    # No module walk, no plan, no table and no upload on the second call.
    for target, name in ((model_mod, "attached_layers"), (model_mod, "plan_for"), (model_mod, "collect"),
                         (pk.dispatch.multi_table.MultiTable, "native_args"), (pk.orbits.OrbitTable, "device_tables")):
        monkeypatch.setattr(target, name, fail)
    second = pk.model_penalty(m)
    second.backward()
    assert model_mod._MODEL_PLANS[m] is plan
    assert torch.equal(first, second)
    torch.testing.assert_close(first.detach(), _expected(m))


def test_model_plan_follows_replaced_moved_and_cast_parameters():
    m = _model()
    pk.model_penalty(m)
    m[2].weight = nn.Parameter(_weight((16, 16, 5, 5), seed=7))  # replaced, new shape
    torch.testing.assert_close(pk.model_penalty(m).detach(), _expected(m))
    m[2].weight.data = _weight((16, 16, 3, 3), seed=8)  # replaced in place through .data
    torch.testing.assert_close(pk.model_penalty(m).detach(), _expected(m))
    m.float()  # cast in place (same Parameter objects)
    out = pk.model_penalty(m)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _expected(m), rtol=1e-5, atol=1e-4)
    m.double()
    m[0] = nn.Conv2d(3, 16, 3).double()  # a layer replaced by one without a symmetry
    torch.testing.assert_close(pk.model_penalty(m).detach(), _expected(m))
    assert len(pk.attached_layers(m)) == 2
    pk.attach_symmetry(m[0], "C4", "trivial", "regular")  # attached again
    torch.testing.assert_close(pk.model_penalty(m).detach(), _expected(m))
    pk.detach_symmetry(m[3])
    torch.testing.assert_close(pk.model_penalty(m).detach(), _expected(m))
    assert len(pk.attached_layers(m)) == 2


@pytest.mark.gpu
def test_model_plan_follows_a_device_move():
    m = _model()
    cpu = pk.model_penalty(m)
    m.cuda()
    gpu = pk.model_penalty(m)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)


# --- torch.compile, each in a fresh process (no eager call builds a table first) -------------------

def _fresh(code: str):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def test_compile_projected_penalty_first_call_fullgraph():
    _fresh("""
        import torch, projkernels as pk, projkernels.backends.reference as R
        w = torch.randn(8, 8, 3, 3, dtype=torch.float64, requires_grad=True)
        f = torch.compile(lambda w: pk.projected_penalty(w, "D4", "regular", "regular"), fullgraph=True)
        p = f(w)
        p.backward()
        pw = R.brute_force_project(w.detach(), "D4", "regular", "regular")
        torch.testing.assert_close(p.detach(), (w.detach() - pw).square().sum())
        torch.testing.assert_close(w.grad, 2 * (w.detach() - pw))
    """)


def test_compile_dynamic_shapes():
    # The orbit table depends on the shape, so each new shape specialises (one graph per shape):
    # what must hold is that every shape compiles and is right.
    _fresh("""
        import torch, projkernels as pk, projkernels.backends.reference as R
        f = torch.compile(lambda w: pk.projected_penalty(w, "C4", "regular", "regular"), dynamic=True, fullgraph=True)
        for n in (4, 8, 12):
            w = torch.randn(n, n, 3, 3, dtype=torch.float64)
            pw = R.brute_force_project(w, "C4", "regular", "regular")
            torch.testing.assert_close(f(w), (w - pw).square().sum())
    """)


def test_compile_multi_and_model_penalty_fullgraph():
    _fresh("""
        import torch, projkernels as pk, projkernels.backends.reference as R
        from torch import nn
        ws = [torch.randn(8, 8, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        f = torch.compile(lambda *ws: pk.multi_penalty([(w, "C4", "regular", "regular") for w in ws])[0], fullgraph=True)
        p = f(*ws)
        p.backward()
        exp = sum((w.detach() - R.brute_force_project(w.detach(), "C4", "regular", "regular")).square().sum() for w in ws)
        torch.testing.assert_close(p.detach(), exp)
        for w in ws:
            torch.testing.assert_close(w.grad, 2 * (w.detach() - R.brute_force_project(w.detach(), "C4", "regular", "regular")))

        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)).double()
        pk.attach_regular_gcnn(m, "C4", last_out="regular")
        g = torch.compile(lambda: pk.model_penalty(m), fullgraph=True)
        out = g()
        out.backward()
        eager = pk.model_penalty(m)
        torch.testing.assert_close(out.detach(), eager.detach())
        assert m[0].weight.grad is not None and m[0].bias.grad is not None
    """)


# --- CUDA graphs (run by the GPU job) -------------------------------------------------------------

class _CapturedOps(TorchDispatchMode):
    """The names of the projkernels_C ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "projkernels_C":
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))


def _capture_and_replay(step, params, replays=3, perturb=None):
    """Warm up, capture ``step`` in a CUDA graph, then replay it; ``perturb(i)`` (if given) writes
    new values into the parameters in place before replay i.  Returns the outputs and gradients of
    each replay and the projkernels_C ops dispatched during the capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up outside the graph: tables built and uploaded here
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    ops = _CapturedOps()
    with torch.cuda.graph(graph), ops:
        out = step()
    grads = [p.grad for p in params]
    results = []
    for i in range(replays):
        if perturb is not None:
            perturb(i)
        graph.replay()
        results.append([out.clone()] + [g.clone() for g in grads])
    return results, ops.names


@pytest.mark.gpu
def test_cuda_graph_captures_projected_penalty_step():
    w = torch.randn(64, 64, 3, 3, device="cuda", requires_grad=True)

    def step():
        w.grad = None
        loss = pk.projected_penalty(w, "C4", "regular", "regular")
        loss.backward()
        return loss.detach()

    replays, _ = _capture_and_replay(step, [w])
    loss = pk.projected_penalty(w, "C4", "regular", "regular")
    (grad,) = torch.autograd.grad(loss, [w])
    for out, g in replays:
        torch.testing.assert_close(out, loss.detach())
        torch.testing.assert_close(g, grad)


@pytest.mark.gpu
def test_cuda_graph_captures_model_penalty_step():
    # The captured step is the fused multi-tensor op (one forward, one backward), and a replay reads
    # whatever the parameters hold at replay time.
    m = _model(torch.float32).cuda()
    params = [p for p in m.parameters()]
    gen = torch.Generator().manual_seed(5)

    def step():
        for p in params:
            p.grad = None
        loss = pk.model_penalty(m)
        loss.backward()
        return loss.detach()

    def perturb(i):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen).cuda())

    replays, names = _capture_and_replay(step, params, perturb=perturb)
    assert names.count("multi_penalty") == 1 and names.count("multi_penalty_backward") == 1, names
    assert "penalty_energy" not in names and "penalty_energy_backward" not in names, names
    # The parameters now hold the last replay's values.
    loss = pk.model_penalty(m)
    grads = torch.autograd.grad(loss, params)
    out, *gs = replays[-1]
    assert torch.equal(out, loss.detach())  # the same launches: bit for bit
    for a, b in zip(gs, grads):
        assert torch.equal(a, b)
    assert not torch.equal(replays[0][0], out)  # the replays did see the new values


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["projected_penalty", "model_penalty"])
def test_reduce_overhead_compile_matches_eager(which):
    m = _model(torch.float32).cuda()
    w = m[2].weight
    if which == "projected_penalty":
        fn = lambda: pk.projected_penalty(w, "C4", "regular", "regular")  # noqa: E731
    else:
        fn = lambda: pk.model_penalty(m)  # noqa: E731
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # the first calls record, later ones replay the CUDA graph
        got = compiled()
    torch.testing.assert_close(got, fn())
