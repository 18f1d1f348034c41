"""What is specific to the CUDA backend ("cuda", csrc/cuda/orbit_kernels.cu), GPU only: large shapes, offset tables
beyond shared memory, streams, bitwise reproducibility, raw-op opcheck.  torch.compile: tests/test_cpp_backend.py.  Values and
gradients on the case matrix are checked through the public API in tests/test_conformance.py."""
import pytest
import torch

import projkernels as pk
from projkernels.backends import reference as R
from projkernels.orbits import orbit_table

C = pytest.importorskip("projkernels.backends.native", reason="projkernels._C is not built")
OPS = torch.ops.projkernels_C

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not C.WITH_CUDA, reason="projkernels._C was built without CUDA"),
]
DEV = "cuda"


def _check(w_cpu, group, ir, orr, rtol):
    """cuda outputs on w vs the float64 reference on the same (rounded) values."""
    table = orbit_table(w_cpu, group, ir, orr)
    w = w_cpu.to(DEV)
    w64 = w_cpu.double()
    norm2 = w64.square().sum()
    pen, eq, spec = C.fused_forward(w, table)
    assert pen.device.type == "cuda" and pen.dtype == R.acc_dtype(w.dtype)
    ref_pen, ref_eq = R.forward(w64, table)
    torch.testing.assert_close(pen.cpu().double(), ref_pen, rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(eq.cpu().double(), ref_eq, rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(spec.cpu().double(), R.spectral_spectrum(w64, table), rtol=rtol, atol=rtol * norm2)
    pen2, eq2, zeros = C.fused_forward(w, table, with_spectrum=False)
    assert torch.equal(pen2, pen) and torch.equal(eq2, eq) and not zeros.any()

    acc = R.acc_dtype(w.dtype)
    gp, ge = torch.tensor(0.7, dtype=acc, device=DEV), torch.tensor(-1.3, dtype=acc, device=DEV)
    dw = C.fused_backward(w, table, gp, ge)
    assert dw.dtype == w.dtype and dw.shape == w.shape and dw.is_contiguous()
    ref_dw = R.backward(w64, table, 0.7, -1.3)
    scale = 4 * w64.abs().max()
    if w.dtype in (torch.float16, torch.bfloat16):
        torch.testing.assert_close(dw.cpu(), ref_dw.to(w.dtype))
        torch.testing.assert_close(C.project(w, table).cpu(), R.project(w64, table).to(w.dtype), rtol=0, atol=0)
    else:
        torch.testing.assert_close(dw.cpu().double(), ref_dw, rtol=rtol, atol=rtol * scale)
        torch.testing.assert_close(C.project(w, table).cpu().double(), R.project(w64, table), rtol=rtol,
                                   atol=rtol * scale)


def test_offsets_not_staged_in_shared_memory():
    # D4 regular -> regular on 9x9 kernels: the offset table (> 16 KiB) is read from global memory.
    torch.manual_seed(0)
    w = torch.randn(16, 8, 9, 9, dtype=torch.float64)
    assert orbit_table(w, "D4", "regular", "regular").offsets.numel() * 4 > 16 * 1024
    _check(w, "D4", "regular", "regular", rtol=1e-12)


def test_bitwise_reproducible():
    torch.manual_seed(3)
    w = torch.randn(256, 256, 3, 3, device=DEV)
    table = orbit_table(w, "D4", "regular", "regular")
    gp, ge = torch.tensor(1.0, device=DEV), torch.tensor(0.5, device=DEV)
    first = C.fused_forward(w, table) + (C.fused_backward(w, table, gp, ge),)
    for _ in range(3):
        again = C.fused_forward(w, table) + (C.fused_backward(w, table, gp, ge),)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_large_shape_matches_cpp():
    torch.manual_seed(4)
    w = torch.randn(1024, 512, 3, 3, dtype=torch.float32)  # 4.7M entries, > 1024 blocks of orbits
    table = orbit_table(w, "C4")
    cpu = C.fused_forward(w.double(), table)
    gpu = C.fused_forward(w.to(DEV), table)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=0)
    # The training call (no spectrum; 4 orbits a thread, so with PROJKERNELS_ORBIT_BATCH=1 the
    # batched kernel) gives the penalty and energy of the spectrum call bit for bit.
    pen, eq, _ = C.fused_forward(w.to(DEV), table, with_spectrum=False)
    assert torch.equal(pen, gpu[0]) and torch.equal(eq, gpu[1])
    dw = C.fused_backward(w.to(DEV), table, torch.tensor(1.0, device=DEV), torch.tensor(0.0, device=DEV))
    torch.testing.assert_close(dw.cpu(), C.fused_backward(w, table, torch.tensor(1.0), torch.tensor(0.0)),
                               rtol=1e-6, atol=1e-6)


def test_runs_on_the_current_stream():
    torch.manual_seed(5)
    w = torch.randn(64, 64, 5, 5, device=DEV)
    expected = pk.penalty_and_energy(w, "D4")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = pk.penalty_and_energy(w, "D4", backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    w = torch.randn(8, 4, 3, 3, dtype=dtype, device=DEV)
    table = orbit_table(w, "D4", "trivial", "regular")
    d = table.device_tables(w.device)._asdict()
    geom = (table.c_out, table.c_in, table.stride_out, table.stride_in)
    acc = R.acc_dtype(dtype)
    torch.library.opcheck(OPS.fused_forward.default,
                          (w, d["offsets"], d["inv_stab"], d["basis"], d["row_irrep"], 5) + geom)
    torch.library.opcheck(OPS.fused_backward.default,
                          (w, torch.tensor(0.25, dtype=acc, device=DEV), torch.tensor(1.5, dtype=acc, device=DEV),
                           d["offsets"], d["inv_stab"]) + geom)
