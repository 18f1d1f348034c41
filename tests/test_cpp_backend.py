"""The compiled CPU backend ("cpp", projkernels._C) against the PyTorch reference."""
import zlib

import pytest
import torch

import projkernels as pk
from projkernels import reference as R
from projkernels.backends import resolve
from projkernels.orbits import orbit_table

from cases import ALL_CASES, REP_PAIRS, case_id, shape_for

C = pytest.importorskip("projkernels.native", reason="projkernels._C is not built")
OPS = torch.ops.projkernels_C


def _seeded(case, dtype=torch.float64):
    torch.manual_seed(zlib.crc32(case_id(case).encode()))
    return torch.randn(case[1], dtype=dtype)


def _check_against_reference(w, table, rtol):
    """Every output of the cpp backend vs the reference on the same (already rounded) values."""
    w64 = w.to(torch.float64)
    norm2 = w64.square().sum()
    acc = R.acc_dtype(w.dtype)
    pen, eq, spec = C.fused_forward(w, table)
    ref_pen, ref_eq = R.forward(w64, table)
    ref_spec = R.spectral_spectrum(w64, table)
    assert pen.dtype == eq.dtype == spec.dtype == acc
    assert pen.shape == eq.shape == () and spec.shape == (len(table.group.irrep_names),)
    torch.testing.assert_close(pen.double(), ref_pen, rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(eq.double(), ref_eq, rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(spec.double(), ref_spec, rtol=rtol, atol=rtol * norm2)

    # The training path skips the spectrum but must give the same two scalars bit for bit.
    pen2, eq2, zeros = C.fused_forward(w, table, with_spectrum=False)
    assert torch.equal(pen2, pen) and torch.equal(eq2, eq) and not zeros.any()

    gp = torch.tensor(0.7, dtype=acc)
    ge = torch.tensor(-1.3, dtype=acc)
    dw = C.fused_backward(w, table, gp, ge)
    assert dw.dtype == w.dtype and dw.shape == w.shape and dw.is_contiguous()
    ref_dw = R.backward(w64, table, gp.double(), ge.double())
    scale = w64.abs().max() * 4
    torch.testing.assert_close(dw.double(), ref_dw, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(C.project(w, table).double(), R.project(w64, table), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_float64_matches_reference(case):
    group, shape, ir, orr = case
    w = _seeded(case)
    _check_against_reference(w, orbit_table(w, group, ir, orr), rtol=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float16, 2e-5), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("case", ALL_CASES[::9], ids=case_id)
def test_low_precision_dtypes(case, dtype, rtol):
    # The inputs are rounded to dtype first; what is left to compare is float32 accumulation, except
    # for dW / P(W), which are rounded back to dtype.
    group, shape, ir, orr = case
    w = _seeded(case).to(dtype)
    table = orbit_table(w, group, ir, orr)
    if dtype == torch.float32:
        _check_against_reference(w, table, rtol)
        return
    w64 = w.double()
    pen, eq, spec = C.fused_forward(w, table)
    assert pen.dtype == torch.float32
    norm2 = w64.square().sum()
    torch.testing.assert_close(pen.double(), R.forward(w64, table)[0], rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(eq.double(), R.forward(w64, table)[1], rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(spec.double(), R.spectral_spectrum(w64, table), rtol=rtol, atol=rtol * norm2)
    p = C.project(w, table)
    assert p.dtype == dtype
    torch.testing.assert_close(p, R.project(w64, table).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("group", ["C16", "D16", "C64", "D32"])
def test_large_groups(group):
    """Orders above the small-group sizes, up to the compiled bound of 64."""
    for ir, orr in REP_PAIRS:
        case = (group, shape_for(group, ir, orr, (), 2, 1), ir, orr)
        w = _seeded(case)
        _check_against_reference(w, orbit_table(w, group, ir, orr), rtol=1e-12)


def test_nearly_equivariant_float32_keeps_relative_accuracy():
    torch.manual_seed(0)
    w0 = torch.randn(24, 16, 5, 5, dtype=torch.float64)
    table = orbit_table(w0, "D4", "regular", "regular")
    w = (R.project(w0, table) + 1e-4 * torch.randn_like(w0)).float()
    exact = R.forward(w.double(), table)[0]
    assert exact / w.double().square().sum() < 1e-6
    pen = C.forward(w, table)[0]
    torch.testing.assert_close(pen.double(), exact, rtol=1e-4, atol=0)


def test_public_api_with_backend_cpp():
    torch.manual_seed(1)
    w = torch.randn(8, 12, 3, 3, dtype=torch.float64)
    args = (w, "C4", "regular", "regular")
    assert resolve("auto", w.device).name == "cpp"
    table = orbit_table(*args)
    pen, eq = pk.penalty_and_energy(*args, backend="cpp")
    ref_pen, ref_eq = R.forward(w, table)
    torch.testing.assert_close(pen, ref_pen, rtol=1e-12, atol=0)
    torch.testing.assert_close(eq, ref_eq, rtol=1e-12, atol=0)
    torch.testing.assert_close(pk.project(*args, backend="cpp"), R.brute_force_project(*args), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pk.spectrum(*args, backend="cpp"), R.spectral_spectrum(w, table), rtol=1e-10, atol=0)

    w.requires_grad_(True)
    (3 * pk.projected_penalty(*args, backend="cpp") + 0.5 * pk.equivariant_energy(*args, backend="cpp")).backward()
    p = R.brute_force_project(w.detach(), "C4", "regular", "regular")
    torch.testing.assert_close(w.grad, 6 * (w.detach() - p) + 1.0 * p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group,shape,ir,orr", [
    ("C4", (2, 2, 3, 3), "trivial", "trivial"),
    ("D4", (8, 2, 2, 2), "trivial", "regular"),
    ("D1", (2, 4, 3), "regular", "trivial"),
    ("C3", (3, 6), "regular", "regular"),
])
def test_gradcheck(group, shape, ir, orr):
    torch.manual_seed(2)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pk.penalty_and_energy(x, group, ir, orr, backend="cpp"), (w,))
    assert torch.autograd.gradcheck(lambda x: pk.project(x, group, ir, orr, backend="cpp"), (w,))


def test_non_contiguous_inputs():
    torch.manual_seed(3)
    big = torch.randn(3, 8, 16, 5, 5, dtype=torch.float32)
    views = [
        big[1],                                     # offset into storage
        big[0, :, ::2],                             # strided channel slice
        big[2].transpose(0, 1)[:8, :16].transpose(0, 1).transpose(2, 3),  # permuted strides
        big[0].permute(0, 1, 3, 2)[:, :, 1:4, 1:4],  # strided kernel window
    ]
    for v in views:
        assert v.is_contiguous() is False or v.storage_offset() > 0
        c = v.contiguous()
        for fn in (pk.projected_penalty, pk.equivariant_energy, pk.project, pk.spectrum):
            torch.testing.assert_close(fn(v, "D2", backend="cpp"), fn(c, "D2", backend="reference"),
                                       rtol=1e-5, atol=1e-5)
        leaf = v.detach().clone().requires_grad_(False)
        g = v.detach().requires_grad_(True)  # a leaf with non-contiguous strides
        pk.projected_penalty(g, "D2", backend="cpp").backward()
        p = R.brute_force_project(leaf, "D2").float()
        torch.testing.assert_close(g.grad, 2 * (leaf - p), rtol=1e-5, atol=1e-5)


def test_deterministic_across_runs_and_thread_counts():
    torch.manual_seed(4)
    w = torch.randn(64, 64, 3, 3, dtype=torch.float32)  # 12288 orbits: many reduction chunks
    table = orbit_table(w, "C4")
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            runs.append(C.fused_forward(w, table) + (C.fused_backward(w, table, torch.tensor(1.0), torch.tensor(2.0)),))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def _op_args(w, group, ir, orr):
    table = orbit_table(w, group, ir, orr)
    d = table.device_tables(w.device)._asdict()
    geom = (table.c_out, table.c_in, table.stride_out, table.stride_in)
    fwd = (w, d["offsets"], d["inv_stab"], d["basis"], d["row_irrep"], len(table.group.irrep_names)) + geom
    acc = R.acc_dtype(w.dtype)
    bwd = (w, torch.tensor(0.25, dtype=acc, device=w.device), torch.tensor(1.5, dtype=acc, device=w.device),
           d["offsets"], d["inv_stab"]) + geom
    return fwd, bwd


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    w = torch.randn(8, 4, 3, 3, dtype=dtype)
    fwd, bwd = _op_args(w, "D4", "trivial", "regular")
    torch.library.opcheck(OPS.fused_forward.default, fwd)
    torch.library.opcheck(OPS.fused_forward.default, fwd, {"with_spectrum": False})
    torch.library.opcheck(OPS.fused_backward.default, bwd)


def test_op_rejects_bad_arguments():
    w = torch.randn(4, 4, 3, 3)
    fwd, bwd = _op_args(w, "C4", "trivial", "regular")
    with pytest.raises(RuntimeError, match="offsets must be a 2-D int32"):
        OPS.fused_forward(w, fwd[1].long(), *fwd[2:])
    with pytest.raises(RuntimeError, match="weight has 72 entries"):
        OPS.fused_forward(w[:2], *fwd[1:])
    with pytest.raises(RuntimeError, match="weight must be float16, bfloat16, float32 or float64"):
        OPS.fused_forward(w.int(), *fwd[1:])
    with pytest.raises(RuntimeError, match="basis must be float64"):
        OPS.fused_forward(w, fwd[1], fwd[2], fwd[3].float(), *fwd[4:])
    with pytest.raises(RuntimeError, match="reach outside the weight"):
        OPS.fused_forward(w, fwd[1] + 1000, *fwd[2:])
    with pytest.raises(RuntimeError, match="grad_eq must hold one value"):
        OPS.fused_backward(w, bwd[1], torch.ones(2), *bwd[3:])
    with pytest.raises(RuntimeError, match="'cpp' backend serves CPU tensors"):
        resolve("cpp", torch.device("cuda"))


def test_cuda_backend_reports_why_it_is_unavailable():
    if torch.cuda.is_available() and C.WITH_CUDA:
        assert resolve("cuda", torch.device("cuda")).name == "cuda"
        return
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        pk.projected_penalty(torch.randn(4, 4, 3, 3), "C4", backend="cuda")


def test_torch_compile_training_step():
    torch.manual_seed(5)
    x = torch.randn(2, 4, 8, 8)
    w0 = torch.randn(8, 4, 3, 3)

    def loss_fn(w):
        y = torch.nn.functional.conv2d(x, w, padding=1)
        return y.square().mean() + 0.1 * pk.projected_penalty(w, "C4", "trivial", "regular", backend="cpp")

    compiled = torch.compile(loss_fn, fullgraph=True)
    w_eager, w_comp = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss_e, loss_c = loss_fn(w_eager), compiled(w_comp)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(w_comp.grad, w_eager.grad)
    assert w_comp.grad.abs().sum() > 0
