"""Kernel paths that only some problems take, against the float64 reference.

* every group-order class of the one switch (csrc/include/static_switch.h): the exact orders 1, 2, 4, 8,
  16, the array classes (other orders up to 64) and the streamed class (any larger order), on the
  cpp backend here and on the cuda backend on a GPU;
* the Triton kernels on shapes whose orbits cross program boundaries, and on large group orders
  (under TRITON_INTERPRET=1 on the CPU, or on a GPU);
* P(W) of a weight holding an inf (inf, as the reference gives, not NaN);
* reproducibility: bitwise across CPU thread counts, across calls and across processes (GPU).

Tests marked ``gpu`` need a CUDA device.
"""
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from projkernels.backends import reference as R
from projkernels.backends import BACKENDS
from projkernels.orbits import orbit_table

from cases import case_id, shape_for

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available() and not INTERPRET


def _cpp():
    if "cpp" not in BACKENDS:
        pytest.skip("projkernels._C is not built")
    return BACKENDS["cpp"]


def _cuda():
    if not HAS_CUDA or "cuda" not in BACKENDS:
        pytest.skip("needs a CUDA device and projkernels._C built with CUDA")
    return BACKENDS["cuda"]


def _triton_device():
    if "triton" not in BACKENDS:
        pytest.skip("Triton is not installed")
    if INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 to run on the CPU")


def _weight(case, dtype=torch.float64):
    torch.manual_seed(zlib.crc32(case_id(case).encode()))
    return torch.randn(case[1], dtype=dtype)


def _check(backend, w, group, ir, orr, rtol, device="cpu"):
    """Every output of ``backend`` on w (moved to ``device``) against the reference in float64."""
    table = orbit_table(w, group, ir, orr)
    w64 = w.double()
    wd = w.to(device)
    norm2 = float(w64.square().sum())
    scale = 4 * float(w64.abs().max())
    pen, eq = backend.forward(wd, table)
    ref_pen, ref_eq = R.forward(w64, table)
    torch.testing.assert_close(pen.cpu().double(), ref_pen, rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(eq.cpu().double(), ref_eq, rtol=rtol, atol=rtol * norm2)
    spec = backend.spectrum(wd, table)
    assert spec.shape == (len(table.group.irrep_names),)
    torch.testing.assert_close(spec.cpu().double(), R.spectral_spectrum(w64, table), rtol=rtol, atol=rtol * norm2)
    acc = R.acc_dtype(w.dtype)
    gp = torch.tensor(0.7, dtype=acc, device=device)
    ge = torch.tensor(-1.3, dtype=acc, device=device)
    dw = backend.backward(wd, table, gp, ge)
    ref_dw = R.backward(w64, table, 0.7, -1.3)
    proj = backend.project(wd, table)
    if w.dtype in (torch.float16, torch.bfloat16):
        # One rounding of the float32 value to the weight's dtype.
        torch.testing.assert_close(dw.cpu().to(w.dtype), ref_dw.to(w.dtype))
        torch.testing.assert_close(proj.cpu().to(w.dtype), R.project(w64, table).to(w.dtype))
    else:
        torch.testing.assert_close(dw.cpu().double(), ref_dw, rtol=rtol, atol=rtol * scale)
        torch.testing.assert_close(proj.cpu().double(), R.project(w64, table), rtol=rtol, atol=rtol * scale)


# Orders of every class: exact (1, 2, 4, 8, 16), array up to 16 (3, 5, 6, 12), array up to 64
# (17, 24, 48, 64), streamed (65 and up).
ORDER_GROUPS = ["C1", "C2", "C3", "C4", "C5", "D3", "D4", "D6", "D8", "C17", "D12", "D24", "C64", "D32",
                "C65", "D40", "C128"]


def _order_cases(group):
    """Kernel-free cases (any order acts on a Linear weight): an orbit per field pair for the large
    orders, every rep pair with several fields for the small ones."""
    order = int(group[1:]) * (2 if group[0] == "D" else 1)
    if order > 64:
        pairs, fields = (("trivial", "regular"), ("regular", "trivial"), ("regular", "regular")), (2, 1)
    else:
        pairs, fields = (("trivial", "trivial"), ("trivial", "regular"), ("regular", "trivial"),
                         ("regular", "regular")), (3, 2)
    return [(group, shape_for(group, ir, orr, (), *fields), ir, orr) for ir, orr in pairs]


@pytest.mark.parametrize("group", ORDER_GROUPS)
def test_cpp_every_order_class(group):
    cpp = _cpp()
    for case in _order_cases(group):
        _check(cpp, _weight(case), group, case[2], case[3], rtol=1e-12)


def test_cpp_streamed_class_in_float32_and_bfloat16():
    cpp = _cpp()
    case = ("C65", shape_for("C65", "regular", "regular", (), 1, 2), "regular", "regular")
    _check(cpp, _weight(case, torch.float32), *[case[0], case[2], case[3]], rtol=2e-5)
    _check(cpp, _weight(case, torch.bfloat16), *[case[0], case[2], case[3]], rtol=2e-5)


def test_cpp_bitwise_independent_of_thread_count():
    cpp = _cpp()
    w = torch.randn(4 * 40, 4 * 24, 3, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    table = orbit_table(w, "C4", "regular", "regular")
    assert table.n_orbits > 4 * 256  # several reduction chunks
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((*cpp.forward(w, table), cpp.spectrum(w, table)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _inf_weight(dtype):
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)
    w[1, 2, 0, 1] = float("inf")
    return w


def _check_project_inf(backend, dtype, device):
    w = _inf_weight(dtype)
    table = orbit_table(w, "C4", "regular", "regular")
    ref = R.project(w.double(), table)
    got = backend.project(w.to(device), table).cpu().double()
    assert torch.isinf(ref).any() and not torch.isnan(ref).any()  # the reference: inf on the orbit
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.equal(got[torch.isinf(got)], ref[torch.isinf(ref)])
    assert not torch.isnan(got).any()
    finite = torch.isfinite(ref)
    tol = 2e-3 if dtype == torch.float16 else 1e-5  # the cpp backend writes P(W) in the weight's dtype
    torch.testing.assert_close(got[finite], ref[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_cpp_project_keeps_inf(dtype):
    _check_project_inf(_cpp(), dtype, "cpu")


def test_triton_project_keeps_inf():
    _check_project_inf(BACKENDS["triton"], torch.float32, _triton_device())


# --- Triton: program boundaries and large orders ------------------------------------------------

TILE_CASES = [
    # 15 field blocks of 36 orbits: 540 orbits, not a multiple of 16.
    ("C4", shape_for("C4", "regular", "regular", (3, 3), 5, 3), "regular", "regular"),
    # D4 on a 5x5 kernel between trivial fields: 6 orbits a block, 21 blocks.
    ("D4", shape_for("D4", "trivial", "trivial", (5, 5), 3, 7), "trivial", "trivial"),
    # Orbits with stabilisers (even kernel has none; a 3x3 centre has the whole group).
    ("D2", shape_for("D2", "trivial", "regular", (3, 3), 3, 2), "trivial", "regular"),
]


@pytest.mark.parametrize("case", TILE_CASES, ids=case_id)
def test_triton_tiles_cross_program_boundaries(case, monkeypatch):
    device = _triton_device()
    from projkernels.backends.triton import kernels as K

    monkeypatch.setattr(K, "_TILE", 64)  # 16 orbits a program: the orbits span many programs
    monkeypatch.setattr(K, "_FINISH_ROWS", 4)
    group, shape, ir, orr = case
    table = orbit_table(shape, group, ir, orr)
    block = K.launch_config(table.group.order)[0]
    assert table.n_orbits > 3 * block and table.n_orbits % block != 0
    _check(BACKENDS["triton"], _weight(case), group, ir, orr, rtol=1e-12, device=device)


@pytest.mark.parametrize("group", ["D12", "C64", "C65", "D40", "C128"])
def test_triton_large_orders(group):
    device = _triton_device()
    case = _order_cases(group)[0 if int(group[1:]) * (2 if group[0] == "D" else 1) > 64 else 3]
    _check(BACKENDS["triton"], _weight(case), group, case[2], case[3], rtol=1e-12, device=device)


def test_triton_bitwise_repeatable():
    device = _triton_device()
    case = TILE_CASES[0]
    w = _weight(case, torch.float32).to(device)
    table = orbit_table(w, case[0], case[2], case[3])
    t = BACKENDS["triton"]
    one = torch.ones((), device=device)
    first = (*t.forward(w, table), t.spectrum(w, table), t.backward(w, table, one, one))
    second = (*t.forward(w, table), t.spectrum(w, table), t.backward(w, table, one, one))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- GPU ----------------------------------------------------------------------------------------

GPU_ORDERS = [f"C{n}" for n in range(1, 18)] + ["C24", "C31", "C32", "C48", "C63", "C64", "C65", "C100", "C128",
                                                 "C256", "D16", "D32", "D33", "D64"]


@pytest.mark.gpu
@pytest.mark.parametrize("group", GPU_ORDERS)
def test_gpu_cuda_every_group_order(group):
    cuda = _cuda()
    order = int(group[1:]) * (2 if group[0] == "D" else 1)
    cases = _order_cases(group) if order <= 128 else [
        (group, shape_for(group, "regular", "trivial", (), 1, 3), "regular", "trivial"),
        (group, shape_for(group, "trivial", "regular", (), 3, 1), "trivial", "regular")]
    for case in cases:
        _check(cuda, _weight(case), group, case[2], case[3], rtol=1e-12, device="cuda")
        if order in (64, 65, 128):
            _check(cuda, _weight(case, torch.float32), group, case[2], case[3], rtol=2e-5, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("group", ["C64", "D32", "C128", "C256"])
def test_gpu_triton_large_orders(group):
    if not HAS_CUDA or "triton" not in BACKENDS:
        pytest.skip("needs a CUDA device and Triton")
    order = int(group[1:]) * (2 if group[0] == "D" else 1)
    case = (group, shape_for(group, "regular", "trivial", (), 1, 3), "regular", "trivial")
    _check(BACKENDS["triton"], _weight(case), group, case[2], case[3], rtol=1e-12, device="cuda")
    if order <= 64:
        case = _order_cases(group)[3]
        _check(BACKENDS["triton"], _weight(case), group, case[2], case[3], rtol=1e-12, device="cuda")


ODD_SHAPES = [
    ("C4", shape_for("C4", "regular", "regular", (5, 5), 29, 37), "regular", "regular"),
    ("D4", shape_for("D4", "trivial", "trivial", (3, 3), 1, 2049), "trivial", "trivial"),
    ("C8", shape_for("C8", "regular", "regular", (), 3, 1000), "regular", "regular"),
    ("D2", shape_for("D2", "regular", "trivial", (7, 7), 130, 3), "regular", "trivial"),
    ("C3", shape_for("C3", "regular", "regular", (), 300, 7), "regular", "regular"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", ODD_SHAPES, ids=case_id)
def test_gpu_odd_shapes_and_dtypes(case, dtype, backend):
    if backend == "cuda":
        b = _cuda()
    else:
        if not HAS_CUDA or "triton" not in BACKENDS:
            pytest.skip("needs a CUDA device and Triton")
        b = BACKENDS["triton"]
    rtol = 1e-12 if dtype == torch.float64 else 2e-5 if dtype == torch.float32 else 1e-4
    _check(b, _weight(case, dtype), case[0], case[2], case[3], rtol=rtol, device="cuda")


_PROCESS_SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch
    import projkernels
    from projkernels.backends import BACKENDS
    from projkernels.orbits import orbit_table
    b = BACKENDS[sys.argv[1]]
    dtype = getattr(torch, sys.argv[2])
    g = torch.Generator().manual_seed(11)
    w = torch.randn(4 * 96, 4 * 80, 3, 3, generator=g).to(dtype).cuda()
    t = orbit_table(w, "C4", "regular", "regular")
    one = torch.ones((), device="cuda")
    out = [*b.forward(w, t), b.spectrum(w, t), b.backward(w, t, one, 0.5 * one), b.project(w, t)]
    print(" ".join(hashlib.sha256(x.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
                   for x in out))
""")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_bitwise_across_processes(backend, dtype):
    if not HAS_CUDA or backend not in BACKENDS:
        pytest.skip(f"needs a CUDA device and the {backend} backend")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)

    def run():
        r = subprocess.run([sys.executable, "-c", _PROCESS_SCRIPT, backend, dtype], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert run() == run()


@pytest.mark.gpu
def test_gpu_cuda_matches_itself_and_multi():
    cuda = _cuda()
    from projkernels.backends import native as C

    ws, ts = [], []
    for i, group in enumerate(["C4", "C65", "D4"]):
        shape = (4 * 64, 4 * 48, 3, 3) if group != "C65" else (65 * 3, 65 * 2)
        rep = "regular"
        w = torch.randn(shape, generator=torch.Generator().manual_seed(20 + i)).cuda()
        ws.append(w)
        ts.append(orbit_table(w, group, "regular" if group != "D4" else "trivial", rep))
    pen, eq = C.multi_forward(ws, ts)
    for l, (w, t) in enumerate(zip(ws, ts)):
        p, e = cuda.forward(w, t)
        p2, e2 = cuda.forward(w, t)
        assert torch.equal(p, p2) and torch.equal(e, e2)
        torch.testing.assert_close(pen[l], p, rtol=1e-5, atol=0)
        torch.testing.assert_close(eq[l], e, rtol=1e-5, atol=0)
    one = torch.ones(len(ws), device="cuda")
    grads = C.multi_backward(ws, ts, one, 0.5 * one)
    for w, t, g in zip(ws, ts, grads):
        ref = cuda.backward(w, t, one[0], 0.5 * one[0])
        assert torch.equal(g, ref)


# --- groups whose tables do not fit -------------------------------------------------------------

@pytest.mark.parametrize("name", ["C1000", "C100000", "D300", "D100000"])
def test_too_large_group_is_refused_before_allocating(name):
    import tracemalloc

    from projkernels import groups

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=name):
            groups.irrep_names(name)
        with pytest.raises(ValueError, match=name):
            orbit_table((4, 4), name, "trivial", "trivial")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2 ** 20  # refused from the order alone, not after building a table


def test_largest_group_order_is_accepted():
    from projkernels import groups

    order = groups.MAX_GROUP_ORDER
    assert order == 512
    assert len(groups.irrep_names(f"C{order}")) == order // 2 + 1
    with pytest.raises(ValueError, match=f"C{order + 1}"):
        groups.irrep_names(f"C{order + 1}")
