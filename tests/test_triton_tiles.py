"""The tiled Triton kernels (``PROJKERNELS_TILED=1``): a program owns whole (out-field, in-field)
blocks of one out-field row, loads them contiguously and gathers the orbits on chip.

Every check here runs the tiled kernels and proves it: the ``launches`` fixture switches the backend's
tiles on and counts the launches of the tiled and the chunked kernels, and each test asserts which ran.
Values are held against the dense oracle of tests/cases.py (the group average built from
permutation matrices, never the orbit tables) and against the chunked kernels.  The plan's knobs are
shrunk so that small weights (the interpreter is slow) cut their rows into several tiles: widths
that do not divide the row, one block a tile, many blocks a tile.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it on a
machine without a GPU).  Tests marked ``gpu`` need a CUDA device.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

import projkernels as pk  # noqa: E402
from projkernels.backends import reference as R  # noqa: E402
from projkernels.backends.triton import finite as TB  # noqa: E402
from projkernels.backends.triton import kernels as K  # noqa: E402
from projkernels.orbits import orbit_table  # noqa: E402

from cases import (TRITON_DEVICE, TRITON_INTERPRET, TRITON_SKIP_REASON, Oracle, case_id, seeded_weight,  # noqa: E402
                   shape_for)

INTERPRET, DEVICE = TRITON_INTERPRET, TRITON_DEVICE
pytestmark = pytest.mark.skipif(DEVICE is None, reason=TRITON_SKIP_REASON)


class _CountedKernel:
    """Stands in for a Triton kernel: counts its launches and forwards them."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


KERNELS = ("_reduce_tiles_kernel", "_apply_tiles_kernel", "_reduce_kernel", "_apply_kernel")


@pytest.fixture
def launches(monkeypatch):
    """The backend with PROJKERNELS_TILED on, every penalty kernel counted; small-weight knobs."""
    monkeypatch.setattr(TB, "TILED", True)
    monkeypatch.setattr(K, "_MIN_TILES", 1)  # no narrowing for small weights: the case picks the width
    counted = {}
    for name in KERNELS:
        counted[name] = _CountedKernel(getattr(K, name))
        monkeypatch.setattr(K, name, counted[name])
    return counted


def _counts(launches):
    return {name: k.launches for name, k in launches.items()}


# (case, _TILE_ENTRIES, the blocks per tile that gives): widths that do not divide the row, one block
# a tile, a whole row in one tile; every rep pair; C4, D4, C2, C3 (|G| and a regular field not powers
# of two); Conv2d, Conv1d and Linear weights; orbits with stabilisers (3x3 centres, D2).
TILE_CASES = [
    (("C4", shape_for("C4", "regular", "regular", (3, 3), 7, 2), "regular", "regular"), 512, 3),
    (("D4", shape_for("D4", "regular", "regular", (3, 3), 3, 2), "regular", "regular"), 1024, 1),
    (("D4", shape_for("D4", "trivial", "trivial", (5, 5), 13, 2), "trivial", "trivial"), 2048, 13),
    (("C2", shape_for("C2", "regular", "trivial", (3,), 9, 3), "regular", "trivial"), 32, 5),
    (("C4", shape_for("C4", "trivial", "regular", (), 10, 3), "trivial", "regular"), 16, 4),
    (("D2", shape_for("D2", "trivial", "regular", (3, 3), 5, 2), "trivial", "regular"), 128, 3),
    (("C3", shape_for("C3", "regular", "regular", (), 7, 2), "regular", "regular"), 64, 5),
]
CASE_IDS = [case_id(c[0]) for c in TILE_CASES]

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative gap allowed between a gradient and the exact one: a few roundings of the accumulation dtype,
# then one rounding to the weight's dtype.
ULP = {dt: 2 * torch.finfo(dt).eps + 16 * torch.finfo(R.acc_dtype(dt)).eps for dt in DTYPES}


def _setup(case, tile_entries, width, monkeypatch, dtype=torch.float64):
    monkeypatch.setattr(K, "_TILE_ENTRIES", tile_entries)
    w = seeded_weight(case, dtype, salt="tiles").to(DEVICE)
    table = orbit_table(w, case[0], case[2], case[3])
    plan = K.plan_tiles(table, w.element_size())
    assert plan is not None and plan.blocks_per_tile == width, plan
    return w, table, plan


def _close_to(got, exact, dtype, what):
    """got (in dtype or its accumulation dtype) within ULP[dtype] of exact, relative to max(|exact|, 1)."""
    gap = ((got.detach().cpu().double() - exact) / exact.abs().clamp_min(1.0)).abs().max()
    assert float(gap) <= ULP[dtype], f"{what}: relative gap {float(gap):.3g} > {ULP[dtype]:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,tile_entries,width", TILE_CASES, ids=CASE_IDS)
def test_tiled_matches_oracle_and_chunked(case, tile_entries, width, dtype, launches, monkeypatch):
    w, table, plan = _setup(case, tile_entries, width, monkeypatch, dtype)
    assert TB.uses_tiles(w, table)
    if width < table.c_in:
        assert plan.tiles_per_row > 1  # the rows are cut: tiles start inside a row
    o = Oracle(w, case[0], case[2], case[3])  # on the rounded weight, in float64
    acc = R.acc_dtype(dtype)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    norm2 = float(o.w.square().sum())

    pen, eq = TB.forward(w, table)
    spec = TB.spectrum(w, table)
    gp = torch.tensor(0.7, dtype=acc, device=DEVICE)
    ge = torch.tensor(-1.3, dtype=acc, device=DEVICE)
    dw = TB.backward(w, table, gp, ge)
    proj = TB.project(w, table)
    assert _counts(launches) == {"_reduce_tiles_kernel": 2, "_apply_tiles_kernel": 2, "_reduce_kernel": 0,
                                 "_apply_kernel": 0}
    assert pen.dtype == eq.dtype == spec.dtype == proj.dtype == acc and dw.dtype == dtype
    assert dw.shape == proj.shape == w.shape

    torch.testing.assert_close(pen.cpu().double(), o.penalty, rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(eq.cpu().double(), o.energy, rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(spec.cpu().double(), o.spectrum, rtol=rtol, atol=rtol * norm2)
    _close_to(dw, 0.7 * o.grad_penalty - 1.3 * o.grad_energy, dtype, "backward")
    _close_to(proj, o.p, R.acc_dtype(dtype), "project")

    # The chunked kernels on the same weight: the same values up to the order of the additions.
    chunked_pen, chunked_eq = K.reduce_orbits(w, table, spectrum=False)
    torch.testing.assert_close(pen, chunked_pen, rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(eq, chunked_eq, rtol=rtol, atol=rtol * norm2)
    torch.testing.assert_close(spec, K.reduce_orbits(w, table, spectrum=True), rtol=rtol, atol=rtol * norm2)
    chunked_dw = K.apply_orbits(w, table, gp, ge, out_dtype=dtype)
    _close_to(dw, chunked_dw.cpu().double(), dtype, "backward against the chunked kernel")
    torch.testing.assert_close(proj, K.apply_orbits(w, table, out_dtype=acc), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("case,tile_entries,width", TILE_CASES[:2] + TILE_CASES[4:5], ids=CASE_IDS[:2] + CASE_IDS[4:5])
def test_tiled_bitwise_repeatable(case, tile_entries, width, launches, monkeypatch):
    w, table, _ = _setup(case, tile_entries, width, monkeypatch, torch.float32)
    one = torch.ones((), device=DEVICE)

    def run(x):
        return (*TB.forward(x, table), TB.spectrum(x, table), TB.backward(x, table, one, 0.5 * one),
                TB.project(x, table))

    first, second = run(w), run(w.clone())
    assert launches["_reduce_tiles_kernel"].launches == 4 and launches["_reduce_kernel"].launches == 0
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_public_api_gradients_through_tiles(dtype, launches, monkeypatch):
    case, tile_entries, width = TILE_CASES[0]
    w0, table, _ = _setup(case, tile_entries, width, monkeypatch, dtype)
    kw = dict(group=case[0], in_rep=case[2], out_rep=case[3], backend="triton")
    o = Oracle(w0, case[0], case[2], case[3])
    w = w0.clone().requires_grad_(True)
    pen, eq = pk.penalty_and_energy(w, **kw)
    (pen + 0.25 * eq).backward()
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(pen.detach().cpu().double(), o.penalty, rtol=rtol, atol=0)
    assert w.grad.dtype == dtype
    _close_to(w.grad, o.grad_penalty + 0.25 * o.grad_energy, dtype, "gradient")
    p = pk.project(w0, **kw)
    assert p.dtype == dtype
    _close_to(p.to(R.acc_dtype(dtype)), o.p, dtype, "project")
    torch.testing.assert_close(pk.spectrum(w0, **kw).cpu().double(), o.spectrum, rtol=rtol,
                               atol=rtol * float(o.w.square().sum()))
    counts = _counts(launches)
    assert counts["_reduce_tiles_kernel"] == 2 and counts["_apply_tiles_kernel"] == 2
    assert counts["_reduce_kernel"] == counts["_apply_kernel"] == 0


def test_gradcheck_through_tiles(launches, monkeypatch):
    case, tile_entries, width = TILE_CASES[3]
    w, _, _ = _setup(case, tile_entries, width, monkeypatch)
    kw = dict(group=case[0], in_rep=case[2], out_rep=case[3], backend="triton")
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pk.penalty_and_energy(x, **kw), (w,))
    assert launches["_apply_tiles_kernel"].launches > 0 and launches["_apply_kernel"].launches == 0


def test_non_contiguous_weight(launches, monkeypatch):
    case, tile_entries, width = TILE_CASES[0]
    monkeypatch.setattr(K, "_TILE_ENTRIES", tile_entries)
    group, shape, ir, orr = case
    big = seeded_weight((group, (shape[1], shape[0], 5, 5), ir, orr), torch.float32, salt="view")
    # dims 0 and 1 swapped, then a 3x3 window of the 5x5 kernel: no dim has its contiguous stride
    w = big.transpose(0, 1)[:, :, 1:4, 1:4].to(DEVICE).requires_grad_(True)
    assert w.shape == shape and not w.is_contiguous()
    o = Oracle(w, group, ir, orr)
    kw = dict(group=group, in_rep=ir, out_rep=orr, backend="triton")
    pen = pk.projected_penalty(w, **kw)
    pen.backward()
    torch.testing.assert_close(pen.detach().cpu().double(), o.penalty, rtol=2e-6, atol=0)
    _close_to(w.grad, o.grad_penalty, torch.float32, "gradient of a strided view")
    _close_to(pk.project(w.detach(), **kw), o.p, torch.float32, "project of a strided view")
    assert launches["_reduce_tiles_kernel"].launches == 1 and launches["_apply_tiles_kernel"].launches == 2
    assert launches["_reduce_kernel"].launches == launches["_apply_kernel"].launches == 0


def test_project_keeps_inf(launches, monkeypatch):
    case, tile_entries, width = TILE_CASES[0]
    w, table, _ = _setup(case, tile_entries, width, monkeypatch, torch.float32)
    w = w.clone()
    w[1, 2, 0, 1] = float("inf")
    got = TB.project(w, table).cpu()
    ref = R.project(w.cpu().double(), table)
    assert torch.isinf(ref).any() and not torch.isnan(got).any()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite].double(), ref[finite], rtol=1e-6, atol=1e-6)
    assert launches["_apply_tiles_kernel"].launches == 1


def test_block_too_large_for_a_tile_takes_the_chunked_kernels(launches):
    # A C64 regular x regular block is 64 x 64 entries, more than a program's tile.
    case = ("C64", shape_for("C64", "regular", "regular", (), 1, 1), "regular", "regular")
    w = seeded_weight(case, torch.float32).to(DEVICE)
    table = orbit_table(w, case[0], case[2], case[3])
    assert K.plan_tiles(table, w.element_size()) is None and not TB.uses_tiles(w, table)
    o = Oracle(w, case[0], case[2], case[3])
    pen, _ = TB.forward(w, table)
    torch.testing.assert_close(pen.cpu().double(), o.penalty, rtol=2e-6, atol=0)
    assert launches["_reduce_kernel"].launches == 1 and launches["_reduce_tiles_kernel"].launches == 0


def test_tiles_off_takes_the_chunked_kernels(launches, monkeypatch):
    monkeypatch.setattr(TB, "TILED", False)
    case, tile_entries, width = TILE_CASES[0]
    w, table, _ = _setup(case, tile_entries, width, monkeypatch, torch.float32)
    assert not TB.uses_tiles(w, table)
    TB.forward(w, table)
    TB.project(w, table)
    assert _counts(launches) == {"_reduce_tiles_kernel": 0, "_apply_tiles_kernel": 0, "_reduce_kernel": 1,
                                 "_apply_kernel": 1}


# --- the plan --------------------------------------------------------------------------------------

PLAN_SHAPES = [("C4", (2048, 2048, 3, 3), "regular", "regular"), ("D4", (1536, 1536, 3, 3), "regular", "regular"),
               ("D4", (2048, 2048, 5, 5), "trivial", "trivial"), ("C4", (64, 300, 3, 3), "trivial", "regular"),
               ("C2", (6, 38, 3), "regular", "trivial"), ("C3", (9, 3 * 25), "regular", "regular"),
               ("D2", (4, 7, 3, 3), "trivial", "regular"), ("C8", (8 * 40, 8 * 36), "regular", "regular")]


@pytest.mark.parametrize("elem_bytes", [2, 4, 8])
@pytest.mark.parametrize("case", PLAN_SHAPES, ids=case_id)
def test_plan_covers_every_block_once_with_aligned_segments(case, elem_bytes):
    group, shape, ir, orr = case
    table = orbit_table(shape, group, ir, orr)
    plan = K.plan_tiles(table, elem_bytes)
    assert plan is not None and plan == K.plan_tiles(table, elem_bytes)
    gp = 1 << (table.group.order - 1).bit_length()
    # Written out from the weight's layout, not from the kernels: block (fo, fi) of a contiguous weight
    # is field_out segments of stride_in entries, segment a at fo*stride_out + a*row_len + fi*stride_in.
    field_in = shape[1] // table.c_in
    stride_in = field_in * math.prod(shape[2:])
    row_len = shape[1] * math.prod(shape[2:])
    assert (plan.so, plan.stride_in, plan.row_len) == (shape[0] // table.c_out, stride_in, row_len)
    seen = []
    for t in range(plan.n_tiles):
        fo, k = divmod(t, plan.tiles_per_row)
        fi0 = k * plan.blocks_per_tile
        width = min(plan.blocks_per_tile, table.c_in - fi0)
        assert width >= 1
        seen += [(fo, fi) for fi in range(fi0, fi0 + width)]
        for a in range(plan.so):  # every segment start and length a whole number of vectors
            assert (fo * table.stride_out + a * row_len + fi0 * stride_in) % plan.vec == 0
        assert (width * stride_in) % plan.vec == 0
    assert seen == [(fo, fi) for fo in range(table.c_out) for fi in range(table.c_in)]
    assert plan.vec * elem_bytes <= 16 and plan.vec & (plan.vec - 1) == 0
    # The register tiles fit their budgets.
    assert plan.so <= plan.so_p and plan.blocks_per_tile * stride_in <= plan.pitch_p
    assert plan.so_p * plan.pitch_p <= K._TILE_ENTRIES
    assert plan.blocks_per_tile * table.orbits_per_block <= plan.orbits_p
    assert plan.orbits_p * gp <= K._GATHER_ENTRIES


def test_plan_of_the_benchmark_weight():
    # C4 regular 2048x2048x3x3 fp32: 14 blocks (504 of 512 lanes a segment) a tile, 4-entry vectors.
    plan = K.plan_tiles(orbit_table((2048, 2048, 3, 3), "C4", "regular", "regular"), 4)
    assert (plan.blocks_per_tile, plan.tiles_per_row, plan.n_tiles) == (14, 37, 512 * 37)
    assert (plan.so_p, plan.pitch_p, plan.orbits_p, plan.vec) == (4, 512, 512, 4)
    # bf16: the width stays even, so every tile starts on a 16-byte boundary.
    assert K.plan_tiles(orbit_table((2048, 2048, 3, 3), "C4", "regular", "regular"), 2).vec == 8


def test_small_weights_get_narrower_tiles():
    table = orbit_table((4 * 8, 4 * 64, 3, 3), "C4", "regular", "regular")
    plan = K.plan_tiles(table, 4)
    assert plan.n_tiles < K._MIN_TILES and plan.blocks_per_tile == 1  # 8 x 64 blocks, 512 tiles
    table = orbit_table((4 * 16, 4 * 512, 3, 3), "C4", "regular", "regular")
    plan = K.plan_tiles(table, 4)  # 14 blocks a tile would give 16 x 37 tiles: halved once
    assert plan.n_tiles >= K._MIN_TILES and plan.blocks_per_tile == 7


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), (None, False)])
def test_environment_switch_is_read_at_import(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "PROJKERNELS_TILED"}
    if value is not None:
        env["PROJKERNELS_TILED"] = value
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    script = ("import torch, projkernels.backends.triton.finite as TB; from projkernels.orbits import orbit_table;"
              "w = torch.zeros(8, 8, 3, 3); print(TB.TILED, TB.uses_tiles(w, orbit_table(w, 'C4', 'regular', 'regular')))")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(expected), str(expected)]


# Compiles the tiled kernels for sm_90 ahead of time, without a GPU (Triton's own compiler, outside the
# interpreter), from the arguments the launch wrappers pass, and prints the PTX's global accesses.
_AOT_SCRIPT = """
import re, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from projkernels.backends.triton import kernels as K
from projkernels.orbits import orbit_table

dtype = getattr(torch, sys.argv[1])
w = torch.zeros(4 * 64, 4 * 64, 3, 3, dtype=dtype)
table = orbit_table(w, "C4", "regular", "regular")
plan = K.plan_tiles(table, w.element_size())
tt = K.tile_tables(table, plan, "cpu")
t = table.device_tables("cpu")
acc = torch.float64 if dtype == torch.float64 else torch.float32
TY = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
      torch.int32: "i32", torch.int64: "i64"}

def compile(kernel, tensors, options):
    consts = {k: v for k, v in options.items() if k != "num_warps"}
    names = kernel.arg_names
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in tensors:
            sig[name] = "*" + TY[tensors[name].dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in consts and name.isupper():
            sig[name] = "constexpr"
        else:
            v = consts.pop(name)
            sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, {k: v for k, v in consts.items()}, attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=options["num_warps"])).asm["ptx"]
    return sorted(set(re.findall(r"(?:ld|st)[.]global[.]v[0-9][.]b[0-9]+", ptx)))

part = torch.zeros(plan.n_tiles, 2, dtype=acc)
out = torch.zeros_like(w)
g = torch.zeros((), dtype=acc)
args = K._tile_args(w, table, plan)
print(" ".join(compile(K._reduce_tiles_kernel, dict(w_ptr=w, gather_index_ptr=tt.gather_index,
               gather_sign_ptr=tt.gather_sign, inv_stab_ptr=t.inv_stab, basis_ptr=t.basis, row_irrep_ptr=t.row_irrep,
               part_ptr=part), dict(args, N_COLS=2, COLS_P=2, SPECTRUM=False))))
print(" ".join(compile(K._apply_tiles_kernel, dict(w_ptr=w, out_ptr=out, gather_index_ptr=tt.gather_index,
               gather_sign_ptr=tt.gather_sign, lane_orbit_ptr=tt.lane_orbit, lane_sign_ptr=tt.lane_sign, gp_ptr=g,
               ge_ptr=g), dict(args, PROJECT=False))))
"""


@pytest.mark.parametrize("dtype,vector", [("float32", "v4.b32"), ("bfloat16", "v4.b32"), ("float64", "v2.b64")])
def test_compiles_for_sm90_with_16_byte_accesses(dtype, vector):
    # The GPU's compiler, not the interpreter: tl.gather and the tile's contiguous accesses must lower, and
    # the tile must move in 16-byte vectors (loads in both kernels, stores in the write pass).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, dtype], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr or "No module named 'triton.backends.nvidia'" in r.stderr):
        pytest.skip(f"Triton cannot compile for NVIDIA GPUs here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    reduce_line, apply_line = r.stdout.strip().splitlines()
    assert f"ld.global.{vector}" in reduce_line.split()
    assert f"ld.global.{vector}" in apply_line.split() and f"st.global.{vector}" in apply_line.split()


# --- GPU ---------------------------------------------------------------------------------------------

LARGE = [("C4", (4 * 96, 4 * 80, 3, 3), "regular", "regular"),
         ("D4", (8 * 24, 8 * 20, 3, 3), "regular", "regular"),
         ("D4", (300, 500, 5, 5), "trivial", "trivial"),
         ("C2", (2 * 100, 333, 7), "regular", "trivial")]


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device with TRITON_INTERPRET unset")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", LARGE, ids=case_id)
def test_gpu_large_tiled(case, dtype, monkeypatch):
    monkeypatch.setattr(TB, "TILED", True)
    group, shape, ir, orr = case
    w = seeded_weight(case, dtype).cuda()
    table = orbit_table(w, group, ir, orr)
    assert TB.uses_tiles(w, table)
    w64 = w.double()
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in zip(TB.forward(w, table), R.forward(w64, table)):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=0)
    spec = TB.spectrum(w, table)
    torch.testing.assert_close(spec.double(), R.spectral_spectrum(w64, table), rtol=rtol,
                               atol=rtol * float(spec.sum()))
    _close_to(TB.project(w, table), R.project(w64, table).cpu(), R.acc_dtype(dtype), "project")
    one = torch.ones((), dtype=spec.dtype, device="cuda")
    _close_to(TB.backward(w, table, one, 0.5 * one), R.backward(w64, table, 1.0, 0.5).cpu(), dtype, "backward")
    first = (*TB.forward(w, table), TB.backward(w, table, one, one))
    second = (*TB.forward(w.clone(), table), TB.backward(w.clone(), table, one, one))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
