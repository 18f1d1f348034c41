"""What is specific to the Triton backend: availability messages, tile pruning, the finishing
reduction's row steps, bitwise reproducibility, and on the GPU large shapes, device guards, opcheck
and torch.compile.  Values and gradients on the case matrix, every dtype, strided inputs and
gradcheck are checked through the public API in tests/test_conformance.py (its Triton routes).

The kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter when the process
starts with TRITON_INTERPRET=1 (that is how CI runs this file):

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_backend.py -q

Without either, only the availability test runs and the rest skips, saying why
(PROJKERNELS_REQUIRE_TRITON=1, see tests/conftest.py, turns such skips into failures).
"""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

import projkernels as pk  # noqa: E402
from projkernels.backends import reference  # noqa: E402
from projkernels.backends import BACKENDS, resolve  # noqa: E402
from projkernels.orbits import orbit_table  # noqa: E402

from cases import TRITON_DEVICE, TRITON_INTERPRET, TRITON_SKIP_REASON, case_id  # noqa: E402

INTERPRET, DEVICE = TRITON_INTERPRET, TRITON_DEVICE
needs_kernels = pytest.mark.skipif(DEVICE is None, reason=TRITON_SKIP_REASON)


def gpu(fn):
    """GPU-only: marked for the suite's CUDA skip, and skipped while the interpreter is on."""
    fn = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                            reason="needs a CUDA device with TRITON_INTERPRET unset")(fn)
    return pytest.mark.gpu(fn)


TRITON = BACKENDS.get("triton")


def _weight(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def test_availability_says_why():
    assert TRITON is not None, "importing projkernels with triton installed must register backend='triton'"
    cpu_reason = TRITON.why_unavailable(torch.device("cpu"))
    if INTERPRET:
        assert cpu_reason is None
        assert "TRITON_INTERPRET" in TRITON.why_unavailable(torch.device("cuda"))
        assert resolve("triton", "cpu") is TRITON
    else:
        assert "TRITON_INTERPRET" in cpu_reason
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            pk.projected_penalty(torch.randn(2, 2, 3, 3), backend="triton")
        if not torch.cuda.is_available():
            assert "CUDA" in TRITON.why_unavailable(torch.device("cuda"))
    assert "CUDA tensors only" in TRITON.why_unavailable(torch.device("meta"))


def test_launch_config_is_fixed_by_the_problem():
    # The configuration fixes the order of every sum, so it may depend on the group order only:
    # nothing timed, nothing about the device or the weight's size.
    from projkernels.backends.triton import kernels as K

    for order in (1, 2, 3, 4, 8, 16, 48, 64, 65, 128, 512):
        block, warps = K.launch_config(order)
        assert (block, warps) == K.launch_config(order)
        assert block & (block - 1) == 0 and K._MIN_BLOCK <= block <= K._MAX_BLOCK
        assert warps == K._NUM_WARPS
        gp = 1 << (order - 1).bit_length()
        assert block * gp <= max(K._TILE, K._MIN_BLOCK * gp)
    assert not hasattr(K, "_reduce_tuned") and not hasattr(K, "_apply_tuned")


@needs_kernels
def test_partial_sums_over_many_rows(monkeypatch):
    # The finishing program adds the per-program rows in steps; make the step tiny so that a small
    # weight walks through several of them, the path that large weights take on a GPU.
    from projkernels.backends.triton import kernels as K

    monkeypatch.setattr(K, "_FINISH_ROWS", 2)
    monkeypatch.setattr(K, "_TILE", 128)  # 16 orbits a program: several rows from a small weight
    w = _weight((8, 16, 3, 3), seed=13)
    table = orbit_table(w, "D4", "regular", "regular")
    if INTERPRET:
        assert table.n_orbits > 2 * K.launch_config(table.group.order)[0]  # three rows, two steps
    scale = float(w.square().sum())
    for a, b in zip(TRITON.forward(w, table), reference.forward(w, table)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14 * scale)
    torch.testing.assert_close(TRITON.spectrum(w, table), reference.spectral_spectrum(w, table),
                               rtol=1e-10, atol=1e-12 * scale)


DTYPE_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
# Relative gap allowed between two gradients: a few roundings of the accumulation dtype apart,
# then each rounded once to the weight's dtype.
ULP = {dt: 2 * torch.finfo(dt).eps + 16 * torch.finfo(reference.acc_dtype(dt)).eps for dt in DTYPE_TOL}


@needs_kernels
def test_deterministic_bitwise():
    group, shape, ir, orr = "D4", (16, 16, 3, 3), "regular", "regular"
    w = _weight(shape, torch.float32, seed=6)
    table = orbit_table(w, group, ir, orr)
    gp = torch.tensor(0.5, device=DEVICE)
    ge = torch.tensor(0.25, device=DEVICE)
    first = (*TRITON.forward(w, table), TRITON.spectrum(w, table), TRITON.project(w, table),
             TRITON.backward(w, table, gp, ge))
    second = (*TRITON.forward(w, table), TRITON.spectrum(w, table), TRITON.project(w, table),
              TRITON.backward(w, table, gp, ge))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- GPU only ----------------------------------------------------------------------------------

LARGE = [("D4", (8 * 32, 8 * 32, 3, 3), "regular", "regular"),
         ("C4", (4 * 64, 256, 5, 5), "trivial", "regular"),
         ("C8", (8 * 256, 8 * 128), "regular", "regular"),
         ("D1", (2 * 128, 300, 7), "regular", "trivial")]



@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", LARGE, ids=case_id)
def test_gpu_large_shapes(case, dtype):
    group, shape, ir, orr = case
    w = _weight(shape, dtype, seed=8)
    table = orbit_table(w, group, ir, orr)
    w64 = w.to(torch.float64)  # the reference in float64 on the same rounded weight
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in zip(TRITON.forward(w, table), reference.forward(w64, table)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=0)
    spec = TRITON.spectrum(w, table)
    torch.testing.assert_close(spec.double(), reference.spectral_spectrum(w64, table), rtol=tol,
                               atol=tol * float(spec.sum()))
    torch.testing.assert_close(TRITON.project(w, table).double(), reference.project(w64, table),
                               rtol=tol, atol=tol)
    one = torch.ones((), dtype=spec.dtype, device=DEVICE)
    grad = TRITON.backward(w, table, one, 0.5 * one).to(torch.float64)
    ref = reference.backward(w64, table, 1.0, 0.5)
    # One rounding to the weight's dtype apart, at most.
    assert float(((grad - ref).abs() / ref.abs().clamp_min(1.0)).max()) <= 2 * ULP[dtype]


@gpu
def test_gpu_reproducible():
    group, shape, ir, orr = LARGE[0]
    w = _weight(shape, torch.float32, seed=9)
    table = orbit_table(w, group, ir, orr)
    one = torch.ones((), device=DEVICE)

    def run(x):
        return (*TRITON.forward(x, table), TRITON.spectrum(x, table), TRITON.project(x, table),
                TRITON.backward(x, table, one, one))

    first = run(w)
    for _ in range(3):
        for a, b in zip(first, run(w.clone())):
            assert torch.equal(a, b)


@gpu
def test_gpu_cuda_device_guard():
    # The launch must go to the tensor's device even when another one is current.
    if torch.cuda.device_count() < 2:
        w = _weight((8, 8, 3, 3), seed=10)
        torch.testing.assert_close(pk.projected_penalty(w, "D4", "regular", "trivial", backend="triton"),
                                   pk.projected_penalty(w, "D4", "regular", "trivial", backend="reference"))
        return
    w = _weight((8, 8, 3, 3), seed=10).to("cuda:1")
    with torch.cuda.device(0):
        got = pk.projected_penalty(w, "D4", "regular", "trivial", backend="triton")
    torch.testing.assert_close(got, pk.projected_penalty(w, "D4", "regular", "trivial", backend="reference"))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gpu_opcheck(dtype):
    w = _weight((8, 16, 3, 3), dtype, seed=11).requires_grad_(True)
    args = ("D4", "trivial", "regular", "triton")
    torch.library.opcheck(pk.library.custom_ops.penalty_energy, (w,) + args)
    torch.library.opcheck(pk.library.custom_ops.project, (w,) + args)
    torch.library.opcheck(pk.library.custom_ops.spectrum, (w.detach(),) + args)
    acc = reference.acc_dtype(dtype)
    gp = torch.tensor(0.5, dtype=acc, device=DEVICE)
    ge = torch.tensor(2.0, dtype=acc, device=DEVICE)
    torch.library.opcheck(pk.library.custom_ops.penalty_energy_backward, (w.detach(), gp, ge) + args)


@gpu
def test_gpu_compiled_training_step():
    import torch.nn.functional as F

    torch.manual_seed(12)
    w0 = torch.randn(4 * 3, 4 * 2, 3, 3, device=DEVICE) * 0.1
    x = torch.randn(5, 4 * 2, 16, 16, device=DEVICE)
    kw = dict(group="C4", in_rep="regular", out_rep="regular", backend="triton")

    def loss_fn(w, x):
        y = F.conv2d(x, w, padding=1)
        penalty, eq = pk.penalty_and_energy(w, **kw)
        return y.square().mean() + 0.1 * penalty + 1e-3 * eq

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.SGD([w], lr=0.1)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = fn(w, x)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        results.append((torch.stack(losses), w.detach()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    # and the step did move the weight towards equivariance
    assert pk.projected_penalty(results[1][1], **kw) < pk.projected_penalty(w0, **kw)
