"""The multi-tensor ops (projkernels_C::multi_forward / multi_backward) against the single-layer ops.

The raw ops are called with arguments built from the public orbit tables, and calls are counted with a
dispatch mode, so these tests do not depend on the Python layer that wraps the ops.
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import projkernels as pk
from projkernels.backends import reference as R
from projkernels.dispatch.multi import multi_penalty
from projkernels.orbits import orbit_table

from cases import Oracle

if "cpp" not in pk.available_backends("cpu"):
    pytest.skip("projkernels._C is not built", allow_module_level=True)
OPS = torch.ops.projkernels_C
WITH_CUDA = bool(OPS.cuda_enabled())


def _multi_args(tables, device):
    d = [t.device_tables(device)._asdict() for t in tables]
    geometry = [g for t in tables for g in (t.c_out, t.c_in, t.stride_out, t.stride_in, int(t.signed))]
    return [x["offsets"] for x in d], [x["inv_stab"] for x in d], geometry


class _RawOps:
    """The raw ops taking orbit tables (what the Python layer does, restated here)."""

    @staticmethod
    def multi_forward(ws, tables):
        return OPS.multi_forward(list(ws), *_multi_args(tables, ws[0].device))

    @staticmethod
    def multi_backward(ws, tables, gp, ge):
        offsets, inv_stab, geometry = _multi_args(tables, ws[0].device)
        return OPS.multi_backward(list(ws), gp, ge, offsets, inv_stab, geometry)

    @staticmethod
    def fused_forward(w, t, with_spectrum=True):
        d = t.device_tables(w.device)._asdict()
        return OPS.fused_forward(w, d["offsets"], d["inv_stab"], d["basis"], d["row_irrep"],
                                 len(t.group.irrep_names), t.c_out, t.c_in, t.stride_out, t.stride_in, int(t.signed),
                                 with_spectrum)

    @staticmethod
    def fused_backward(w, t, gp, ge):
        d = t.device_tables(w.device)._asdict()
        return OPS.fused_backward(w, gp, ge, d["offsets"], d["inv_stab"], t.c_out, t.c_in, t.stride_out, t.stride_in,
                                  int(t.signed))


C = _RawOps


class _OpCounter(TorchDispatchMode):
    """Counts calls of the projkernels_C ops, with the dtype of the first weight of each multi call."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()
        self.dtypes = []

    # The public multi op runs the raw one below the dispatcher's Python key, where a dispatch mode
    # does not see it: count the public op under the raw op's name.
    _RAW_NAME = {"multi_penalty": "multi_forward", "multi_penalty_backward": "multi_backward"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "projkernels_C":
            name = self._RAW_NAME.get(func._opname, func._opname)
            self.calls[name] += 1
            if name == "multi_forward":
                assert len({w.dtype for w in args[0]}) == 1, "one dtype per multi-op call"
                self.dtypes.append(args[0][0].dtype)
        return func(*args, **(kwargs or {}))

# Groups of orders 2, 4, 8 and 32 (one block per chunk must switch between them), trivial and
# regular fields on either side, Linear / Conv1d / Conv2d weights, and one layer spanning several
# CPU chunks (more than 256 orbits).
SPECS = [
    ((8, 3, 3, 3), "C4", "trivial", "regular"),
    ((32, 16, 3, 3), "C4", "regular", "regular"),
    ((32, 16, 3, 3), "C4", "regular", "regular"),   # same shape as its neighbour, different weights
    ((8, 8, 3, 3), "D4", "regular", "regular"),
    ((8, 16, 4, 4), "D4", "regular", "trivial"),
    ((16, 8), "C8", "regular", "regular"),
    ((5, 16, 1, 1), "C8", "regular", "trivial"),
    ((4, 6, 5), "D1", "trivial", "regular"),
    ((6, 4, 3), "D1", "regular", "trivial"),
    ((3, 5), "C4", "trivial", "trivial"),
    ((32, 32), "D16", "regular", "regular"),
]


def _weights(specs, dtypes, seed=0, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s[0], generator=g, dtype=torch.float64).to(device=device, dtype=dt)
            .requires_grad_(requires_grad) for s, dt in zip(specs, dtypes)]


def _tables(specs):
    return [orbit_table(*s) for s in specs]


def _items(ws, specs):
    return [(w, *s[1:]) for w, s in zip(ws, specs)]


def _grad_vectors(n, acc, device="cpu"):
    return (torch.linspace(0.5, 2.0, n, dtype=acc, device=device),
            torch.linspace(-1.0, 1.5, n, dtype=acc, device=device))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_raw_ops_equal_single_layer_ops_bitwise(dtype):
    # Same CPU chunking and summation order as fused_forward / fused_backward: identical bits.
    ws = _weights(SPECS, [dtype] * len(SPECS))
    tables = _tables(SPECS)
    acc = R.acc_dtype(dtype)
    pen, eq = C.multi_forward(ws, tables)
    assert pen.dtype == eq.dtype == acc and pen.shape == eq.shape == (len(SPECS),)
    gp, ge = _grad_vectors(len(SPECS), acc)
    grads = C.multi_backward(ws, tables, gp, ge)
    for i, (w, t) in enumerate(zip(ws, tables)):
        p1, e1, _ = C.fused_forward(w, t, with_spectrum=False)
        assert torch.equal(pen[i], p1) and torch.equal(eq[i], e1), i
        d1 = C.fused_backward(w, t, gp[i], ge[i])
        assert grads[i].dtype == dtype and grads[i].shape == w.shape and grads[i].is_contiguous()
        assert torch.equal(grads[i], d1), i


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_multi_penalty_matches_sum_of_reference_layers(dtype, rtol):
    ws = _weights(SPECS, [dtype] * len(SPECS), seed=1, requires_grad=True)
    tp, te, pp, pe = multi_penalty(_items(ws, SPECS), backend="cpp")
    ref = [R.forward(w.detach().double(), t) for w, t in zip(ws, _tables(SPECS))]
    sp = torch.stack([p for p, _ in ref])
    se = torch.stack([e for _, e in ref])
    assert tp.dtype == pp.dtype == dtype
    torch.testing.assert_close(pp.double(), sp, rtol=rtol, atol=0)
    torch.testing.assert_close(pe.double(), se, rtol=rtol, atol=0)
    torch.testing.assert_close(tp.double(), sp.sum(), rtol=rtol, atol=0)
    torch.testing.assert_close(te.double(), se.sum(), rtol=rtol, atol=0)

    # Layer l sees gp_l = 0.7 + c_l and ge_l = 0.3 + d_l: dW_l = 2 gp_l (W - P W) + 2 ge_l P W.
    c, d = _grad_vectors(len(SPECS), dtype)
    loss = 0.7 * tp + 0.3 * te + (c * pp).sum() + (d * pe).sum()
    grads = torch.autograd.grad(loss, ws)
    for i, (g, w, s) in enumerate(zip(grads, ws, SPECS)):
        w64 = w.detach().double()
        p = R.brute_force_project(w64, *s[1:])
        expected = 2 * (0.7 + c[i].item()) * (w64 - p) + 2 * (0.3 + d[i].item()) * p
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g.double(), expected, rtol=rtol, atol=rtol * w64.abs().max())


def test_auto_on_cpu_is_the_fused_multi_op():
    ws = _weights(SPECS, [torch.float32] * len(SPECS), requires_grad=True)
    with _OpCounter() as counter:
        tp, te, _, _ = multi_penalty(_items(ws, SPECS))
        tp.backward()
    # One call per direction for the whole list, and no single-layer op.
    assert counter.calls == Counter(multi_forward=1, multi_backward=1), counter.calls
    for w, s in zip(ws, SPECS):  # the penalty's own gradient, 2 (W - P W), layer by layer
        o = Oracle(w.detach().double(), *s[1:])
        torch.testing.assert_close(w.grad.double(), o.grad_penalty, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_one_call_per_dtype():
    dtypes = [torch.float64, torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float32,
              torch.float64, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    ws = _weights(SPECS, dtypes, seed=2, requires_grad=True)
    tables = _tables(SPECS)
    with _OpCounter() as counter:
        tp, te, pp, pe = multi_penalty(_items(ws, SPECS), backend="cpp")
    assert sorted(map(str, counter.dtypes)) == sorted(map(str, set(dtypes)))
    assert pp.dtype == pe.dtype == torch.float64  # the promoted accumulation dtype
    for i, (w, t) in enumerate(zip(ws, tables)):
        p1, e1, _ = C.fused_forward(w.detach(), t, with_spectrum=False)
        assert pp[i].item() == p1.item() and pe[i].item() == e1.item(), i

    c, d = _grad_vectors(len(SPECS), torch.float64)
    with _OpCounter() as counter:
        grads = torch.autograd.grad((c * pp).sum() + (d * pe).sum(), ws)
    assert counter.calls["multi_backward"] == len(set(dtypes))
    for i, (g, w, t) in enumerate(zip(grads, ws, tables)):
        acc = R.acc_dtype(w.dtype)
        assert g.dtype == w.dtype
        expected = C.fused_backward(w.detach(), t, c[i].to(acc), d[i].to(acc))
        assert torch.equal(g, expected), i


GRADCHECK_SPECS = [
    ((4, 1, 3, 3), "C4", "trivial", "regular"),
    ((8, 8, 1, 1), "D4", "regular", "regular"),
    ((8, 3), "C8", "trivial", "regular"),
    ((2, 2, 3), "D1", "regular", "regular"),
    ((2, 3), "C4", "trivial", "trivial"),
]


def test_float64_gradcheck():
    ws = _weights(GRADCHECK_SPECS, [torch.float64] * len(GRADCHECK_SPECS), seed=3, requires_grad=True)
    scale = torch.arange(1.0, len(GRADCHECK_SPECS) + 1, dtype=torch.float64)

    def f(*weights):
        tp, te, pp, pe = multi_penalty(_items(weights, GRADCHECK_SPECS), backend="cpp")
        return tp + 0.5 * te + (pp * scale).sum(), pe

    assert torch.autograd.gradcheck(f, ws)


def test_deterministic_across_runs_and_thread_counts():
    specs = [((64, 64, 3, 3), "C4", "trivial", "trivial"), ((32, 32, 3, 3), "D4", "regular", "regular")] + SPECS
    ws = _weights(specs, [torch.float32] * len(specs), seed=4)
    tables = _tables(specs)
    gp, ge = _grad_vectors(len(specs), torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            runs.append((*C.multi_forward(ws, tables), *C.multi_backward(ws, tables, gp, ge)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def _op_args(ws, specs, device="cpu"):
    offsets, inv_stab, geometry = _multi_args(_tables(specs), torch.device(device))
    acc = R.acc_dtype(ws[0].dtype)
    gp, ge = _grad_vectors(len(ws), acc, device)
    return (ws, offsets, inv_stab, geometry), (ws, gp, ge, offsets, inv_stab, geometry)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    specs = [SPECS[i] for i in (0, 1, 3, 5, 6, 7)]
    ws = _weights(specs, [dtype] * len(specs), seed=5)
    fwd, bwd = _op_args(ws, specs)
    torch.library.opcheck(OPS.multi_forward.default, fwd)
    torch.library.opcheck(OPS.multi_backward.default, bwd)


def test_backward_outputs_are_separate_gradients():
    # Every dW is its own tensor: right shape and dtype, contiguous, the fused_backward values, no
    # overlap with another layer's dW (an in-place update of one leaves the others alone).
    ws = _weights(SPECS, [torch.float32] * len(SPECS), seed=13)
    _, bwd = _op_args(ws, SPECS)
    grads = OPS.multi_backward(*bwd)
    tables = _tables(SPECS)
    want = [C.fused_backward(w, t, gp, ge) for w, t, gp, ge in zip(ws, tables, bwd[1], bwd[2])]
    for g, w, x in zip(grads, ws, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
        assert torch.equal(g, x)
    spans = sorted((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size()) for g in grads)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    grads[3].fill_(float("nan"))  # an optimizer's in-place update of one gradient
    for i, (g, x) in enumerate(zip(grads, want)):
        assert i == 3 or torch.equal(g, x)


def test_op_rejects_bad_arguments():
    specs = [SPECS[0], SPECS[1], SPECS[3]]
    ws = _weights(specs, [torch.float32] * 3)
    fwd, bwd = _op_args(ws, specs)
    with pytest.raises(RuntimeError, match=r"weights\[1\].*call once per dtype"):
        OPS.multi_forward([ws[0], ws[1].double(), ws[2]], *fwd[1:])
    with pytest.raises(RuntimeError, match="geometry must hold"):
        OPS.multi_forward(ws, fwd[1], fwd[2], fwd[3][:-1])
    with pytest.raises(RuntimeError, match="one offsets and one inv_stab tensor per weight"):
        OPS.multi_forward(ws, fwd[1][:2], fwd[2], fwd[3])
    with pytest.raises(RuntimeError, match=r"weights\[2\].*weight has 288 entries"):
        OPS.multi_forward([ws[0], ws[1], ws[2][:4]], *fwd[1:])
    with pytest.raises(RuntimeError, match=r"grad_penalty must have shape \[3\]"):
        OPS.multi_backward(ws, bwd[1][:2], *bwd[2:])


# --- CUDA ----------------------------------------------------------------------------------------

def _cuda_specs(n):
    """n layers cycling through SPECS (every group order, rep pair and kernel rank)."""
    return [SPECS[i % len(SPECS)] for i in range(n)]


@pytest.mark.gpu
@pytest.mark.skipif(not WITH_CUDA, reason="projkernels._C was built without CUDA")
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_cuda_matches_cpu_and_is_deterministic(dtype, rtol):
    ws = _weights(SPECS, [dtype] * len(SPECS), seed=6)
    tables = _tables(SPECS)
    acc = R.acc_dtype(dtype)
    gp, ge = _grad_vectors(len(SPECS), acc)
    cpu_pen, cpu_eq = C.multi_forward(ws, tables)
    cpu_grads = C.multi_backward(ws, tables, gp, ge)

    wc = [w.cuda() for w in ws]
    runs = [(*C.multi_forward(wc, tables), *C.multi_backward(wc, tables, gp.cuda(), ge.cuda())) for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))
    pen, eq, *grads = runs[0]
    assert pen.dtype == acc and pen.device.type == "cuda"
    norm2 = torch.stack([w.double().square().sum() for w in ws])
    torch.testing.assert_close(pen.cpu().double(), cpu_pen.double(), rtol=rtol, atol=0)
    torch.testing.assert_close(eq.cpu().double(), cpu_eq.double(), rtol=rtol, atol=0)
    assert (pen.cpu().double() + eq.cpu().double() - norm2).abs().max() <= 10 * rtol * norm2.max()
    for g, cg in zip(grads, cpu_grads):
        assert g.dtype == dtype and g.shape == cg.shape
        # Half types round dW to dtype after the same float32 math; allow one ulp of difference.
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=rtol, atol=rtol)
        torch.testing.assert_close(g.cpu(), cg, **tol)

    # Through the public API, with gradients, against the CPU fused backend.
    leaves = [w.detach().requires_grad_(True) for w in wc]
    tp, te, pp, pe = multi_penalty(_items(leaves, SPECS), backend="cuda")
    torch.testing.assert_close(pp.cpu().double(), cpu_pen.double(), rtol=rtol, atol=0)
    grads = torch.autograd.grad(tp + 0.5 * te, leaves)
    cpu_leaves = [w.detach().requires_grad_(True) for w in ws]
    ctp, cte, _, _ = multi_penalty(_items(cpu_leaves, SPECS), backend="cpp")
    cpu_grads = torch.autograd.grad(ctp + 0.5 * cte, cpu_leaves)
    for g, cg in zip(grads, cpu_grads):
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=rtol, atol=rtol)
        torch.testing.assert_close(g.cpu(), cg, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not WITH_CUDA, reason="projkernels._C was built without CUDA")
def test_cuda_gradcheck_and_opcheck():
    ws = _weights(GRADCHECK_SPECS, [torch.float64] * len(GRADCHECK_SPECS), seed=7, device="cuda",
                  requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *x: multi_penalty(_items(x, GRADCHECK_SPECS), backend="cuda")[2:], ws)
    specs = SPECS[:4]
    wf = _weights(specs, [torch.float32] * 4, seed=8, device="cuda")
    fwd, bwd = _op_args(wf, specs, device="cuda")
    torch.library.opcheck(OPS.multi_forward.default, fwd)
    torch.library.opcheck(OPS.multi_backward.default, bwd)


@pytest.mark.gpu
@pytest.mark.skipif(not WITH_CUDA, reason="projkernels._C was built without CUDA")
def test_cuda_twenty_layers_cost_one_launch_per_direction():
    from torch.profiler import ProfilerActivity, profile

    specs = _cuda_specs(20)
    ws = _weights(specs, [torch.float32] * 20, seed=9, device="cuda", requires_grad=True)
    items = _items(ws, specs)
    tp, te, _, _ = multi_penalty(items, backend="auto")  # warm-up: tables moved to the device once
    (tp + te).backward()
    torch.cuda.synchronize()
    for w in ws:
        w.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tp, te, _, _ = multi_penalty(items, backend="auto")
        (tp + te).backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [n for n in names if "projkernels" in n]
    assert sum("multi_forward_kernel" in n for n in ours) == 1, ours
    assert sum("multi_finalize_kernel" in n for n in ours) == 1, ours
    assert sum("multi_backward_kernel" in n for n in ours) == 1, ours
    assert len(ours) == 3, ours  # no single-layer kernels
    for w, s in zip(ws, specs):  # d (penalty + energy) / dW = 2 W says nothing about P: check P on its own
        o = Oracle(w.detach().double().cpu(), *s[1:])
        torch.testing.assert_close(w.grad.cpu().double(), 2 * o.w, rtol=1e-5, atol=1e-5)
    leaves = [w.detach().requires_grad_(True) for w in ws]
    tp, te, _, _ = multi_penalty(_items(leaves, specs), backend="auto")
    for w, g, s in zip(ws, torch.autograd.grad(tp, leaves), specs):
        o = Oracle(w.detach().double().cpu(), *s[1:])
        torch.testing.assert_close(g.cpu().double(), o.grad_penalty, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not WITH_CUDA, reason="projkernels._C was built without CUDA")
def test_cuda_graph_captures_the_fused_op_over_several_launches():
    # 70 layers: more than one launch's worth of descriptors (32), so the capture records three
    # groups of launches per direction.  The graph must hold the fused op itself (no per-layer
    # single-weight ops) and replay on new weight values written in place: the captured launches
    # read the weights' addresses, not a copy of their values or of a host-side descriptor.
    specs = _cuda_specs(70)
    ws = _weights(specs, [torch.float32] * len(specs), seed=11, device="cuda", requires_grad=True)
    items = _items(ws, specs)

    def step():
        for w in ws:
            w.grad = None
        tp, te, pen, _ = multi_penalty(items, backend="cuda")
        (tp + 0.25 * te + (pen * torch.arange(1.0, len(ws) + 1, device="cuda")).sum()).backward()
        return tp.detach(), pen.detach()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    counter = _OpCounter()
    with torch.cuda.graph(graph), counter:
        out_tp, out_pen = step()
    assert counter.calls["multi_forward"] == 1 and counter.calls["multi_backward"] == 1, counter.calls
    assert counter.calls["fused_forward"] == 0 and counter.calls["penalty_energy"] == 0, counter.calls
    captured_grads = [w.grad for w in ws]

    g = torch.Generator().manual_seed(12)
    for _ in range(2):
        with torch.no_grad():
            for w in ws:
                w.copy_(torch.randn(w.shape, generator=g).cuda())
        graph.replay()
        torch.cuda.synchronize()
        got = [out_tp.clone(), out_pen.clone()] + [gr.clone() for gr in captured_grads]
        # The same values eagerly: bit for bit, since the launches and their reductions are the same.
        want_tp, want_pen = step()
        want = [want_tp, want_pen] + [w.grad for w in ws]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        # And against the CPU op (another chunking: close, not equal).
        cpu_pen, _ = C.multi_forward([w.detach().cpu() for w in ws], _tables(specs))
        torch.testing.assert_close(got[1].cpu(), cpu_pen, rtol=1e-5, atol=0)
