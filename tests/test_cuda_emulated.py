"""The CUDA kernels of csrc/cuda/*.cu, run on the CPU over an emulated device (tests/cuda_emu).

Each .cu file is compiled as it is, with its launches rewritten to run every block and every thread
of the grid on the CPU (threads as fibers that switch at the barriers and shuffles), and its host
functions, also unchanged, registered as the ops of a library of their own
(``torch.ops.projkernels_emu_<file>``).  So the host code that sizes a launch and plans shared
memory, and the device code, run in CI on CPU tensors, against the CPU kernels and the oracles.
The emulated device reports a hang (a barrier or shuffle some threads never reach), a write past
the dynamic shared memory, and a launch above its shared-memory limit; shared memory starts as NaN,
so a read of what no thread wrote shows in the results.  Lowering that limit drives the kernels
into their fallbacks (tables and operands read from global memory instead of shared memory).

What this cannot show: speed, memory-ordering races between threads of a block (the fibers see each
other's writes at once), and anything of the real compiler and hardware.  The GPU tests (marked gpu)
remain the word on those.
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from projkernels.backends import reference as R
from projkernels.orbits import orbit_table

C = pytest.importorskip("projkernels.backends.native", reason="projkernels._C is not built")
OPS = torch.ops.projkernels_C
S = importlib.import_module("projkernels.symmetry.steerable")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cuda_emu"))
import build as emu  # noqa: E402

from test_steerable_ops_synthetic import (CASES, FALLBACKS, TOL, _blockwise_expected, _check, _run,  # noqa: E402
                                          fallback_layout, householder, synthetic)

_SHARED_DEFAULT = 48 * 1024
_STATIC_RESERVE = 1024  # csrc/cuda/cuda_launch.cuh kStaticSharedReserve


@pytest.fixture(scope="module")
def selftest():
    return emu.load(str(HERE / "cuda_emu" / "selftest.cu"))


@pytest.fixture(scope="module")
def steer():
    ops = emu.load("steerable_kernels.cu")
    yield ops
    ops.emu_set_shared_limit(_SHARED_DEFAULT)


# The opt-in switches, on or off for one emulated library whatever the environment says.
_TILED = 'std::getenv("PROJKERNELS_TILED")'
_BATCHED = {"cuda_launch.cuh": {'std::getenv("PROJKERNELS_ORBIT_BATCH")': '"1"'}}
_ONE_ORBIT = {"cuda_launch.cuh": {'std::getenv("PROJKERNELS_ORBIT_BATCH")': "nullptr"}}


def _finite_lib(variant):
    tiled = {_TILED: '"1"' if variant == "tiled" else "nullptr"}
    batch = _BATCHED if variant == "batched" else _ONE_ORBIT
    return emu.load("orbit_kernels.cu", variant=variant, substitutions=tiled, header_substitutions=batch)


@pytest.fixture(scope="module", params=["chunked", "tiled"])
def finite(request):
    ops = _finite_lib(request.param)
    yield ops
    ops.emu_set_shared_limit(_SHARED_DEFAULT)


# Batching applies where a thread walks a whole batch of orbits (large weights, below), so only the
# batching tests build the batched library.
@pytest.fixture(scope="module", params=["chunked", "batched"])
def batching(request):
    return _finite_lib(request.param)


@pytest.fixture(scope="module", params=["one_orbit", "batched"])
def multi(request):
    return emu.load("multi_kernels.cu", variant=request.param,
                    header_substitutions=_BATCHED if request.param == "batched" else _ONE_ORBIT)


@pytest.fixture
def shared_limit():
    """Set the emulated device's shared-memory limit for one test (every emulated library shares it)."""
    libs = []

    def set_limit(ops, nbytes):
        libs.append(ops)
        ops.emu_set_shared_limit(nbytes)
    yield set_limit
    for ops in libs:
        ops.emu_set_shared_limit(_SHARED_DEFAULT)


# --- the emulated device itself ---------------------------------------------------------------------

def test_the_emulated_block_reduction_is_the_sum(selftest):
    x = torch.randn(5 * 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(selftest.block_sums(x), x.view(5, 256).sum(1), rtol=1e-14, atol=1e-14)


def test_the_emulated_device_reports_what_a_gpu_would_hang_or_fault_on(selftest, shared_limit):
    x = torch.zeros(1)
    before = selftest.emu_launch_count()
    selftest.overrun(0)  # every thread in its own slot
    assert selftest.emu_launch_count() == before + 1
    with pytest.raises(RuntimeError, match="wrote past its 1024 bytes of dynamic shared memory"):
        selftest.overrun(1)
    with pytest.raises(RuntimeError, match="half_warp_kernel: the block hangs"):
        selftest.half_warp(x)
    assert bool(selftest.unwritten(x, 1024).isnan().all())
    assert bool(selftest.unwritten_static(x).isnan().all())  # both blocks: static shared memory too
    # Through shared memory across warps: right after a barrier; without it, a warp runs ahead of
    # the warp it reads from (each block in its own direction), and reads what was never written.
    expected = ((torch.arange(256) + 32) % 256).float().repeat(2)
    assert torch.equal(selftest.neighbour(x, 1), expected)
    racy = selftest.neighbour(x, 0).view(2, 8, 32)
    assert bool(racy[0, 0].isnan().all()) and bool(racy[1, 7].isnan().all())  # first warp to run, each block
    shared_limit(selftest, 512)
    with pytest.raises(RuntimeError, match="1024 bytes of dynamic shared memory exceed the device's 512"):
        selftest.unwritten(x, 1024)


def test_the_emulated_kernels_are_compiled_as_the_device_pass(selftest):
    # nvcc compiles the kernels with __CUDA_ARCH__ defined, and the headers' device branches differ
    # from the host's (loop_bound: unrolled classes loop to their array bound, skipping g >= |G|):
    # the emulator must run those branches, not the host code's.
    assert selftest.device_loop_bound(16, 3) == 16 and selftest.device_loop_bound(8, 8) == 8
    assert selftest.device_loop_bound(64, 50) == 50  # not unrolled: to |G|, as on the host


def test_the_rewrite_keeps_every_launch_and_no_cuda_syntax():
    for name in ("orbit_kernels.cu", "multi_kernels.cu", "decay_kernels.cu", "steerable_kernels.cu"):
        src = (emu.CSRC / "cuda" / name).read_text()
        out = emu.rewrite(src, "lib")
        assert "<<<" not in out and "extern __shared__" not in out and "__shared__" not in out
        assert out.count("::cuda_emu::launch(") == src.count("<<<") > 0
        assert "TORCH_LIBRARY(lib, m)" in out and "projkernels_C, CUDA" not in out


# --- steerable kernels (csrc/cuda/steerable_kernels.cu) ----------------------------------------------

def _gpu_layout(sym, dtype, monkeypatch):
    # The GPU's tiles (2048 elements of work), built for CPU tensors.
    monkeypatch.setattr(S, "_CPU_TILE_ELEMS", S._TILE_ELEMS)
    return S._native_layout(sym, torch.device("cpu"), torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("name", list(CASES))
def test_steerable_cuda_kernels_match_the_dense_projection_and_the_cpu(steer, name, dtype, monkeypatch):
    args, ranks = CASES[name]
    sym = synthetic(*args, ranks)
    w = torch.randn(sym.weight_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    lay = _gpu_layout(sym, dtype, monkeypatch)
    _check(sym, w, TOL[dtype], ops=steer, lay=lay)
    for a, b in zip(_run(sym, w, steer, lay), _run(sym, w, OPS, lay)):  # the CPU kernels on the same layout
        torch.testing.assert_close(a.double(), b.double(), rtol=TOL[dtype], atol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", FALLBACKS)
def test_steerable_cuda_fallbacks_below_the_shared_memory_budget(steer, kind, dtype, shared_limit, monkeypatch):
    # The layouts of the GPU fallback tests at a budget of 300 numbers: coefficients in the global
    # scratch, the tile's blocks gathered from W, Q_t^T read from global memory.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    budget = 300
    shared_limit(steer, budget * acc.itemsize + _STATIC_RESERVE)
    sym = fallback_layout(kind, budget, householder)
    w = torch.randn(sym.weight_shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    _check(sym, w, TOL[dtype], expected=_blockwise_expected, ops=steer, lay=_gpu_layout(sym, dtype, monkeypatch))


def test_a_steerable_kernel_without_its_staging_barrier_fails_here(monkeypatch):
    # The emulation is worth its name only if it catches what a GPU would get wrong: the real
    # kernels with the barrier after the staging of the tile removed give NaN.
    src = (emu.CSRC / "cuda" / "steerable_kernels.cu").read_text()
    barrier = "    s.x = xs;\n  }\n  __syncthreads();\n  return s;"
    assert src.count(barrier) == 1
    mutant = emu.load("steerable_kernels.cu", variant="no_staging_barrier",
                      substitutions={barrier: "    s.x = xs;\n  }\n  return s;"})
    sym = synthetic(*CASES["many"][0], CASES["many"][1])
    w = torch.randn(sym.weight_shape, dtype=torch.float64)
    lay = _gpu_layout(sym, torch.float64, monkeypatch)
    pen, eq = mutant.steerable_penalty_energy(w, lay.table, lay.geometry)
    assert not (bool(pen.isfinite()) and bool(eq.isfinite()))


def test_steerable_launch_counts(steer, monkeypatch):
    sym = synthetic(*CASES["mixed"][0], CASES["mixed"][1])
    w = torch.randn(sym.weight_shape, dtype=torch.float64)
    lay = _gpu_layout(sym, torch.float64, monkeypatch)
    n = steer.emu_launch_count()
    steer.steerable_penalty_energy(w, lay.table, lay.geometry)
    assert steer.emu_launch_count() == n + 2  # the tiles, then the fixed-order sum of their partials
    steer.steerable_project(w, lay.table, lay.geometry)
    assert steer.emu_launch_count() == n + 3


# --- finite-group kernels (csrc/cuda/orbit_kernels.cu), chunked and tiled ------------------------------

# All but the last (odd sizes) have more orbits than a block has threads (256), so that every warp
# of a block holds orbits: a block reduction that loses one warp's partial is wrong on each of them.
FINITE = [((16, 16, 3, 3), "C4", "regular", "regular"), ((8, 32, 5, 5), "D4", "trivial", "regular"),
          ((24, 64, 3, 3), "D4", "regular", "trivial"), ((512, 256), "C64", "regular", "regular"),
          ((64, 1024), "D32", "regular", "trivial"), ((48, 48, 3, 3, 3), "Oh", "regular", "regular"),
          ((200, 300), "C100", "trivial", "regular"), ((6, 3, 7), "C2", "trivial", "trivial")]
FINITE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# The sums (penalty, energy, spectrum) of a half-precision weight are float32 sums of float32 terms
# of exactly representable inputs (w64 holds the rounded weight): they differ from the float64
# reference by float32's accumulation alone, a small multiple of eps32 * sum |terms| (every term is
# a square, and their sum is at most ||W||^2), not by the weight's dtype.  A tolerance of the
# weight's eps (1e-2 ||W||^2 for bfloat16) would pass a sum missing 1/64 of its terms.
SUM_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _finite_run(ops, w, t):
    d = t.device_tables(w.device, w.dtype)
    pen, eq, spec = ops.fused_forward(w, d.offsets, d.inv_stab, d.basis, d.row_irrep, *t.geometry, True)
    pen2, eq2, zeros = ops.fused_forward(w, d.offsets, d.inv_stab, d.basis, d.row_irrep, *t.geometry, False)
    assert torch.equal(pen2, pen) and torch.equal(eq2, eq) and not bool(zeros.any())
    gp, ge = torch.tensor(0.7, dtype=pen.dtype), torch.tensor(-1.3, dtype=pen.dtype)
    dw = ops.fused_backward(w, gp, ge, d.offsets, d.inv_stab, *t.geometry[1:])
    return pen, eq, spec, dw


def _finite_check(ops, shape, group, ir, orr, dtype):
    t = orbit_table(shape, group, ir, orr)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    w64 = w.double()
    pen, eq, spec, dw = _finite_run(ops, w, t)
    tol, stol, norm2 = FINITE_TOL[dtype], SUM_TOL[dtype], float(w64.square().sum())
    ref_pen, ref_eq = R.forward(w64, t)
    torch.testing.assert_close(pen.double(), ref_pen, rtol=stol, atol=stol * norm2)
    torch.testing.assert_close(eq.double(), ref_eq, rtol=stol, atol=stol * norm2)
    # The FFT oracle for cyclic and dihedral groups, the isotypic-basis route for the cube groups.
    oracle = R.spectral_spectrum if t.group.rotation_order * (2 if t.group.has_reflections else 1) == t.group.order \
        else R.basis_spectrum
    torch.testing.assert_close(spec.double(), oracle(w64, t), rtol=stol, atol=stol * norm2)
    assert dw.dtype == w.dtype and dw.shape == w.shape
    ref_dw = R.backward(w64, t, 0.7, -1.3)
    torch.testing.assert_close(dw.double(), ref_dw, rtol=tol, atol=tol * 4 * float(w64.abs().max()))
    # The CPU kernels on the same weight: the same per-orbit arithmetic, other summation trees.
    cpu = _finite_run(OPS, w, t)
    for a, b in zip((pen, eq, spec), cpu[:3]):
        torch.testing.assert_close(a.double(), b.double(), rtol=stol, atol=stol * norm2)
    torch.testing.assert_close(dw.double(), cpu[3].double(), rtol=tol, atol=tol)  # rounded to the weight's dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", FINITE, ids=lambda c: f"{c[1]}-{c[2]}-{c[3]}-{'x'.join(map(str, c[0]))}")
def test_finite_cuda_kernels_match_the_reference(finite, case, dtype):
    _finite_check(finite, *case, dtype)


# Signed-permutation fields (negative offsets, read as SignedOffset): the vector rep of C4, a direct sum
# with regular and 1-D sign fields of D4, the cube's vector -> pseudovector, and C100's sign rep
# (above the array orders: the streamed orbit math with signs).
SIGNED = [((16, 16, 3, 3), "C4", "vector", "vector"),
          ((12, 32, 3, 3), "D4", "vector", ["regular", "vector", "pseudoscalar", "trivial"]),
          ((9, 9, 3, 3, 3), "Oh", "vector", "pseudovector"),
          ((200, 300), "C100", "irrep_50", "trivial")]
SIGNED_IDS = ["C4-vector", "D4-sum", "Oh-pseudovector", "C100-sign"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SIGNED, ids=SIGNED_IDS)
def test_finite_cuda_kernels_read_signed_offsets(finite, case, dtype):
    assert orbit_table(*case).signed
    _finite_check(finite, *case, dtype)


def test_multi_and_decay_cuda_kernels_read_signed_offsets(multi, decay):
    # Signed and unsigned layers in one launch: the encoding is switched per layer, like the group order.
    from projkernels.decay import apply_decay_
    specs = [FINITE[0], SIGNED[0], FINITE[1], SIGNED[1], SIGNED[2], SIGNED[3]]
    g = torch.Generator().manual_seed(11)
    ws = [torch.randn(s[0], generator=g, dtype=torch.float64) for s in specs]
    tables = [orbit_table(*s) for s in specs]
    offsets = [t.device_tables("cpu").offsets for t in tables]
    inv_stab = [t.device_tables("cpu").inv_stab for t in tables]
    geometry = [v for t in tables for v in t.geometry[1:]]
    pen, eq = multi.multi_forward(ws, offsets, inv_stab, geometry)
    gp, ge = torch.linspace(0.5, 1.5, len(specs)), torch.linspace(-1, 1, len(specs))
    dws = multi.multi_backward(ws, gp, ge, offsets, inv_stab, geometry)
    _check_against_the_reference(pen, eq, dws, ws, tables, gp, ge)
    coef_dev = [0.9 - 0.05 * i for i in range(len(specs))]
    coef_mean = [1.0 - 0.01 * i for i in range(len(specs))]
    got, want = [x.clone() for x in ws], [x.clone() for x in ws]
    decay.multi_decay_(got, offsets, geometry, coef_dev, coef_mean)
    apply_decay_(want, None, tables, coef_dev, coef_mean, backend="reference")
    for a, b, s in zip(got, want, specs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{s[1]}: {m}")


@pytest.mark.parametrize("case", [FINITE[0], FINITE[3], FINITE[5]], ids=["C4", "C64", "Oh"])
def test_finite_cuda_kernels_with_little_shared_memory(finite, case, shared_limit):
    # 2 KiB of shared memory: the offset tables and the spectrum basis are read from global memory,
    # and tiles that do not fit are not used.
    shared_limit(finite, 2048 + _STATIC_RESERVE)
    _finite_check(finite, *case, torch.float32)


# --- the multi-tensor kernels (csrc/cuda/multi_kernels.cu) ---------------------------------------------

# A weight on which every thread of the single-weight kernels walks 4 orbits (C4, float32; 64 bytes
# a thread, launch_plan.h): one batch of 4 in the forward and two of 2 in the backward when batching
# is on.  Smaller weights get fewer orbits a thread, so that they still spread over the GPU, and
# below a batch's worth they never batch.  Its orbit count is no multiple of the chunk (1024 orbits
# for C4, 512 for D4): the last chunk is partial (704 and 352 orbits), so the grid must round up and
# the last chunk's threads walk short batches.
_BATCHING_SHAPE = (992, 1000, 3, 3)


def _chunk_orbits(n_orbits, G, elem_bytes, threads=256):
    # plan_chunk_orbits of launch_plan.h: 64 bytes of weight a thread, up to 8 orbits, fewer while
    # the weight would give under 1024 chunks.
    per_thread = 8
    while per_thread > 1 and per_thread * G * elem_bytes > 64:
        per_thread //= 2
    while per_thread > 1 and -(-n_orbits // (per_thread * threads)) < 1024:
        per_thread //= 2
    return per_thread * threads


@pytest.mark.parametrize("group", ["C4", "D4"])
def test_finite_kernels_on_a_weight_that_batches(batching, group):
    t = orbit_table(_BATCHING_SHAPE, group, "regular", "regular")
    chunk = _chunk_orbits(t.n_orbits, t.group.order, 4)
    assert chunk > 256 and t.n_orbits % chunk != 0  # several orbits a thread, and a partial last chunk
    w = torch.randn(_BATCHING_SHAPE, generator=torch.Generator().manual_seed(7))
    got, want = _finite_run(batching, w, t), _finite_run(OPS, w, t)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert torch.equal(got[3], want[3])  # the same arithmetic per entry
    # And against the float64 reference (no code shared with the kernels): the last chunk's 704
    # (352) orbits are 3e-4 of the weight's, well above float32's rounding of these sums.
    w64 = w.double()
    rpen, req = R.forward(w64, t)
    torch.testing.assert_close(got[0].double(), rpen, rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1].double(), req, rtol=1e-5, atol=0)
    ref_dw = R.backward(w64, t, 0.7, -1.3)
    torch.testing.assert_close(got[3].double(), ref_dw, rtol=1e-5, atol=1e-5 * float(ref_dw.abs().max()))


@pytest.mark.parametrize("group", ["C4", "D4"])
def test_multi_kernels_on_layers_that_batch(multi, group):
    # 64x64x3x3: chunks of 1024 orbits, 4 a thread (batches of 4 or 2 forward, 2 or 1 backward).
    ws = [torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    t = orbit_table((64, 64, 3, 3), group, "regular", "regular")
    d = t.device_tables("cpu")
    args = ([d.offsets] * 2, [d.inv_stab] * 2, t.geometry[1:] * 2)
    for a, b in zip(multi.multi_forward(ws, *args), OPS.multi_forward(ws, *args)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    gp, ge = torch.tensor([0.7, 1.1]), torch.tensor([-0.3, 0.2])
    for a, b in zip(multi.multi_backward(ws, gp, ge, *args), OPS.multi_backward(ws, gp, ge, *args)):
        assert torch.equal(a, b)


# The batch's sums and stores taken from the batch's first orbit: wrong wherever a batch runs.
_FIRST_ORBIT_ONLY = {**_BATCHED, "multi_math.h": {
    "loaded_orbit_energy<K, false>(f[b], G, inv_stab[b])": "loaded_orbit_energy<K, false>(f[0], G, inv_stab[b])",
    "store_orbit_gradient<K>(f[b], out, st.base": "store_orbit_gradient<K>(f[0], out, st.base"}}


def test_the_batched_variants_run_the_batched_walk():
    # Guards the "batched" libraries above: with the batches broken, the same calls give wrong
    # penalties and gradients, so the batched walks are what those tests ran.
    w = torch.randn(_BATCHING_SHAPE, generator=torch.Generator().manual_seed(6))
    t = orbit_table(_BATCHING_SHAPE, "C4", "regular", "regular")
    d = t.device_tables("cpu", w.dtype)
    gp, ge = torch.tensor([0.7]), torch.tensor([-0.3])
    args = ([d.offsets], [d.inv_stab], t.geometry[1:])
    multi = emu.load("multi_kernels.cu", variant="batched_first_orbit_only", header_substitutions=_FIRST_ORBIT_ONLY)
    assert not torch.allclose(multi.multi_forward([w], *args)[0], OPS.multi_forward([w], *args)[0])
    assert not torch.allclose(multi.multi_backward([w], gp, ge, *args)[0], OPS.multi_backward([w], gp, ge, *args)[0])
    single = emu.load("orbit_kernels.cu", variant="batched_first_orbit_only", substitutions={_TILED: "nullptr"},
                      header_substitutions=_FIRST_ORBIT_ONLY)
    pen = single.fused_forward(w, d.offsets, d.inv_stab, d.basis, d.row_irrep, *t.geometry, False)[0]
    assert not torch.allclose(pen, OPS.multi_forward([w], *args)[0][0])
    one = torch.tensor(0.7)
    dw = single.fused_backward(w, one, one * 0, d.offsets, d.inv_stab, *t.geometry[1:])
    assert not torch.allclose(dw, OPS.fused_backward(w, one, one * 0, d.offsets, d.inv_stab, *t.geometry[1:]))


def _check_against_the_reference(pen, eq, dws, ws, tables, gp, ge):
    # The reference backend in float64 on the same (float32) weights: unlike the CPU op, it shares
    # no header with the kernels, so a mistake in the shared per-orbit math (multi_math.h,
    # orbit_math.h) shows here.  float32 sums of n positive terms: well within 1e-5 relative.
    for i, (w, t) in enumerate(zip(ws, tables)):
        w64 = w.double()
        rpen, req = R.forward(w64, t)
        torch.testing.assert_close(pen[i].double(), rpen, rtol=1e-5, atol=0, msg=lambda m: f"layer {i} penalty: {m}")
        torch.testing.assert_close(eq[i].double(), req, rtol=1e-5, atol=0, msg=lambda m: f"layer {i} energy: {m}")
        ref = R.backward(w64, t, float(gp[i]), float(ge[i]))
        torch.testing.assert_close(dws[i].double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()),
                                   msg=lambda m: f"layer {i} gradient: {m}")


def test_multi_cuda_kernels_over_several_launches(multi):
    # 40 layers: two launches of up to 32 layers each, layers of several groups and orders, among
    # them C100 (above the array orders: the streamed orbit math).
    specs = [FINITE[i % 7] for i in range(40)]
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(s[0], generator=g, dtype=torch.float64).float() for s in specs]
    tables = [orbit_table(*s) for s in specs]
    offsets = [t.device_tables("cpu").offsets for t in tables]
    inv_stab = [t.device_tables("cpu").inv_stab for t in tables]
    geometry = [v for t in tables for v in t.geometry[1:]]
    n = multi.emu_launch_count()
    pen, eq = multi.multi_forward(ws, offsets, inv_stab, geometry)
    assert multi.emu_launch_count() == n + 4  # (chunks, per-layer sums) per group of 32 layers
    rpen, req = OPS.multi_forward(ws, offsets, inv_stab, geometry)
    torch.testing.assert_close(pen, rpen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eq, req, rtol=1e-5, atol=1e-5)
    gp, ge = torch.linspace(0.5, 1.5, 40), torch.linspace(-1, 1, 40)
    dws = multi.multi_backward(ws, gp, ge, offsets, inv_stab, geometry)
    for dw, ref in zip(dws, OPS.multi_backward(ws, gp, ge, offsets, inv_stab, geometry)):
        torch.testing.assert_close(dw, ref, rtol=1e-5, atol=1e-5)
    _check_against_the_reference(pen, eq, dws, ws, tables, gp, ge)
    # A total's gradient expanded over the layers (stride 0) is read in place.
    one = torch.ones(()).expand(40)
    for dw, ref in zip(multi.multi_backward(ws, one, one * 0, offsets, inv_stab, geometry),
                       OPS.multi_backward(ws, torch.ones(40), torch.zeros(40), offsets, inv_stab, geometry)):
        torch.testing.assert_close(dw, ref, rtol=1e-5, atol=1e-5)


# --- the decay kernels (csrc/cuda/decay_kernels.cu) ---------------------------------------------------

@pytest.fixture(scope="module")
def decay():
    # The layers' descriptors travel as a kernel argument (as the multi-tensor ops' do): the host
    # code runs unchanged here, with nothing uploaded.
    return emu.load("decay_kernels.cu")


def test_decay_cuda_kernels_match_the_cpu_op(decay):
    specs = FINITE[:7]  # C100: the streamed update (no per-orbit array)
    g = torch.Generator().manual_seed(8)
    ws = [torch.randn(s[0], generator=g, dtype=torch.float64).float() for s in specs]
    grads = [torch.randn(s[0], generator=g, dtype=torch.float64).float() for s in specs]
    tables = [orbit_table(*s) for s in specs]
    offsets = [t.device_tables("cpu").offsets for t in tables]
    geometry = [v for t in tables for v in t.geometry[1:]]
    coef_dev = [0.9 - 0.05 * i for i in range(len(specs))]
    coef_mean = [1.0 - 0.01 * i for i in range(len(specs))]
    got, want = [w.clone() for w in ws], [w.clone() for w in ws]
    decay.multi_decay_(got, offsets, geometry, coef_dev, coef_mean)
    OPS.multi_decay_(want, offsets, geometry, coef_dev, coef_mean)
    for a, b, w in zip(got, want, ws):
        assert not torch.equal(a, w)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    got, want = [x.clone() for x in grads], [x.clone() for x in grads]
    decay.multi_decay_grad_(got, ws, offsets, geometry, coef_dev, coef_mean)
    OPS.multi_decay_grad_(want, ws, offsets, geometry, coef_dev, coef_mean)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_decay_cuda_kernels_match_the_reference_backend(decay):
    # The CPU op compiles the same per-orbit update (decay_math.h) as the kernels, so a mistake there
    # moves both; the reference backend (plain tensor code) does not.  float64: the update is then
    # exact to rounding.  Every order class: exact (C4, D4), bounded arrays (C64, D32, Oh) and the
    # streamed orders above 64 (C100).
    from projkernels.decay import apply_decay_
    specs = FINITE[:7]
    assert any(orbit_table(*s).group.order > 64 for s in specs)
    g = torch.Generator().manual_seed(9)
    ws = [torch.randn(s[0], generator=g, dtype=torch.float64) for s in specs]
    grads = [torch.randn(s[0], generator=g, dtype=torch.float64) for s in specs]
    tables = [orbit_table(*s) for s in specs]
    offsets = [t.device_tables("cpu").offsets for t in tables]
    geometry = [v for t in tables for v in t.geometry[1:]]
    coef_dev = [0.9 - 0.05 * i for i in range(len(specs))]
    coef_mean = [1.0 - 0.01 * i for i in range(len(specs))]
    for target in ("weights", "grads"):
        src = ws if target == "weights" else grads
        got, want = [x.clone() for x in src], [x.clone() for x in src]
        if target == "weights":  # in place: W <- W + c_dev (W - PW) + c_mean PW
            decay.multi_decay_(got, offsets, geometry, coef_dev, coef_mean)
            apply_decay_(want, None, tables, coef_dev, coef_mean, backend="reference")
        else:  # into the gradients, from the weights
            decay.multi_decay_grad_(got, ws, offsets, geometry, coef_dev, coef_mean)
            apply_decay_(want, ws, tables, coef_dev, coef_mean, backend="reference")
        for a, b, s in zip(got, want, specs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{target}, {s[1]}: {m}")


def test_decay_cuda_kernels_over_several_launches(decay):
    # 40 layers of mixed dtypes: two launches of up to 32 layers each (the descriptors are kernel
    # arguments, a launch's group of them), every order class among them.
    specs = [FINITE[i % 7] for i in range(40)]
    dtypes = [(torch.float32, torch.float64, torch.float16, torch.bfloat16)[i % 4] for i in range(40)]
    g = torch.Generator().manual_seed(10)
    ws = [torch.randn(s[0], generator=g, dtype=torch.float64).to(dt) for s, dt in zip(specs, dtypes)]
    grads = [torch.randn(s[0], generator=g, dtype=torch.float64).to(dt) for s, dt in zip(specs, dtypes)]
    tables = [orbit_table(*s) for s in specs]
    offsets = [t.device_tables("cpu").offsets for t in tables]
    geometry = [v for t in tables for v in t.geometry[1:]]
    coef_dev = [0.9 - 0.01 * i for i in range(40)]
    coef_mean = [1.0 - 0.005 * i for i in range(40)]
    got, want = [w.clone() for w in ws], [w.clone() for w in ws]
    n = decay.emu_launch_count()
    decay.multi_decay_(got, offsets, geometry, coef_dev, coef_mean)
    assert decay.emu_launch_count() == n + 2
    OPS.multi_decay_(want, offsets, geometry, coef_dev, coef_mean)
    for a, b, w in zip(got, want, ws):
        assert not torch.equal(a, w)
        torch.testing.assert_close(a, b)  # the same per-orbit update, nothing summed across orbits
    got, want = [x.clone() for x in grads], [x.clone() for x in grads]
    decay.multi_decay_grad_(got, ws, offsets, geometry, coef_dev, coef_mean)
    OPS.multi_decay_grad_(want, ws, offsets, geometry, coef_dev, coef_mean)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
