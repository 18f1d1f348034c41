"""What is specific to the compiled CPU backend ("cpp"): its raw ops (torch.ops.projkernels_C), their
argument checks, opcheck and bitwise determinism, and torch.compile through it.

Values, gradients, dtypes, strided inputs and errors through the public API are checked for every
backend in tests/test_conformance.py; the raw ops are called here with arguments built from the
public orbit table, so these tests do not depend on how the Python layer wraps them.
"""
import pytest
import torch

import projkernels as pk
from projkernels.orbits import orbit_table

from cases import Oracle, seeded_weight

if "cpp" not in pk.available_backends("cpu"):
    pytest.skip("projkernels._C is not built", allow_module_level=True)
OPS = torch.ops.projkernels_C


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _op_args(w, group, ir, orr, grad_penalty=0.25, grad_eq=1.5):
    """(fused_forward args, fused_backward args) for w, from the public orbit table."""
    table = orbit_table(w, group, ir, orr)
    d = table.device_tables(w.device)._asdict()
    geom = (table.c_out, table.c_in, table.stride_out, table.stride_in)
    fwd = (w, d["offsets"], d["inv_stab"], d["basis"], d["row_irrep"], len(table.group.irrep_names)) + geom
    acc = _acc(w.dtype)
    bwd = (w, torch.tensor(grad_penalty, dtype=acc, device=w.device),
           torch.tensor(grad_eq, dtype=acc, device=w.device), d["offsets"], d["inv_stab"]) + geom
    return fwd, bwd


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    w = seeded_weight(("D4", (8, 4, 3, 3), "trivial", "regular"), dtype)
    fwd, bwd = _op_args(w, "D4", "trivial", "regular")
    torch.library.opcheck(OPS.fused_forward.default, fwd)
    torch.library.opcheck(OPS.fused_forward.default, fwd, {"with_spectrum": False})
    torch.library.opcheck(OPS.fused_backward.default, bwd)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_training_forward_skips_only_the_spectrum(dtype):
    # with_spectrum=False gives the same two scalars bit for bit and a zero spectrum.
    w = seeded_weight(("D4", (16, 8, 3, 3), "regular", "regular"), dtype)
    fwd, _ = _op_args(w, "D4", "regular", "regular")
    pen, eq, spec = OPS.fused_forward(*fwd)
    pen2, eq2, zeros = OPS.fused_forward(*fwd, with_spectrum=False)
    assert pen.dtype == eq.dtype == spec.dtype == _acc(dtype)
    assert torch.equal(pen2, pen) and torch.equal(eq2, eq) and not zeros.any() and spec.abs().sum() > 0


def test_deterministic_across_runs_and_thread_counts():
    w = seeded_weight(("C4", (64, 64, 3, 3), "trivial", "trivial"), torch.float32)  # many reduction chunks
    fwd, bwd = _op_args(w, "C4", "trivial", "trivial", 1.0, 2.0)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            runs.append(tuple(OPS.fused_forward(*fwd)) + (OPS.fused_backward(*bwd),))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


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


def test_large_kernel_offset_table():
    # D4 regular -> regular on 9x9 kernels: an offset table of 48 KiB, larger than the case matrix reaches.
    case = ("D4", (16, 8, 9, 9), "regular", "regular")
    w = seeded_weight(case)
    assert orbit_table(w, "D4", "regular", "regular").offsets.numel() * 4 > 16 * 1024
    o = Oracle(w, "D4", "regular", "regular")
    pen, eq = pk.penalty_and_energy(w, "D4", "regular", "regular", backend="cpp")
    torch.testing.assert_close(pen, o.penalty, rtol=1e-12, atol=0)
    torch.testing.assert_close(eq, o.energy, rtol=1e-12, atol=0)


# The compiled backends' training step under torch.compile (the CUDA one runs where a GPU is).
@pytest.mark.parametrize("backend,device", [("cpp", "cpu"), pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
def test_torch_compile_training_step(backend, device):
    if backend not in pk.available_backends(device):
        pytest.skip(f"the {backend} backend cannot serve {device} tensors here")
    torch.manual_seed(5)
    x = torch.randn(2, 4, 8, 8, device=device)
    w0 = torch.randn(8, 4, 3, 3, device=device)

    def loss_fn(w):
        y = torch.nn.functional.conv2d(x, w, padding=1)
        return y.square().mean() + 0.1 * pk.projected_penalty(w, "C4", "trivial", "regular", backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True)
    w_eager, w_comp = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss_e, loss_c = loss_fn(w_eager), compiled(w_comp)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(w_comp.grad, w_eager.grad)
    assert w_comp.grad.abs().sum() > 0
