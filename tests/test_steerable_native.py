"""The compiled route of steerable symmetries: backends "cpp" (csrc/cpu/steerable_kernels.cpp) and "cuda"
(csrc/cuda/steerable_kernels.cu).

Oracles: the dense projection of the escnn layer's own expansion (tests/test_steerable.py builds
it from the layer, not from projkernels' blocks), the dense basis assembled from the block types
(``sym.dense_basis()``), and the reference route.  The CUDA tests (marked gpu) hold the GPU against
the CPU kernels on the same cases.
"""
import os

import pytest
import torch

if os.environ.get("PROJKERNELS_REQUIRE_ESCNN") == "1":
    import escnn  # noqa: F401  (CI sets the variable: there these checks must run, not skip)
else:
    escnn = pytest.importorskip("escnn", reason="escnn is an optional test dependency (pip install '.[escnn]')")
from escnn import gspaces, nn as enn  # noqa: E402
from escnn.group import so2_group  # noqa: E402

import projkernels as pk  # noqa: E402
from projkernels.dispatch.config import config_on  # noqa: E402

C = pytest.importorskip("projkernels.backends.native", reason="projkernels._C is not built")
if not hasattr(torch.ops.projkernels_C, "steerable_penalty_energy"):
    pytest.skip("projkernels._C was built without the steerable ops", allow_module_level=True)
OPS = torch.ops.projkernels_C

from test_steerable import _expand, _random, case, dense_projection  # noqa: E402

# SO(2) conv2d, O(2) conv2d, SO(3) conv3d, a discrete gspace, a Linear, unevenly spaced fields
NAMES = ["so2_conv2d", "o2_conv2d", "so3_conv3d", "c4_regular_conv2d", "so2_linear", "so2_conv2d_uneven"]


def _many_blocks():
    """Many fields of four SO(2) irreps: dozens of tiles, so the parallel split has work to split."""
    gs = gspaces.rot2dOnR2(-1)
    t = enn.FieldType(gs, [gs.irrep(k) for k in range(4)] * 6)
    return pk.steerable(t, t, 5)


def _many_blocks_linear():
    G = so2_group(4)
    gs = gspaces.no_base_space(G)
    t = enn.FieldType(gs, [G.irrep(k) for k in range(4)] * 16)
    return pk.steerable(t, t)


def _native(sym, w):
    n = sym.layout(w.device, pk.orbits.acc_dtype(w.dtype)).native
    return n.table, n.geometry


def _n_tiles(geometry):
    rows = [geometry[3 + 9 * i: 12 + 9 * i] for i in range((len(geometry) - 3) // 9)]
    return rows[-1][8] + -(-rows[-1][3] * rows[-1][4] // rows[-1][7])


# --- values against independent dense projections --------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_cpp_matches_the_dense_projections(name):
    sym, _ = case(name)
    P, _ = dense_projection(name)  # from the escnn layer's expansion
    q = sym.dense_basis()
    P_blocks = q @ q.T            # from projkernels' block types, assembled densely
    w = _random(sym, seed=21)
    # P comes from escnn's own float32 samples, projkernels' basis from its analytic basis sampled in
    # float64: the two spaces agree to float32 sampling noise (about 1e-7), and the kernels are held to
    # the float64 block projector exactly.
    torch.testing.assert_close(P_blocks, P, rtol=0, atol=1e-5)
    pw = (P_blocks @ w.reshape(-1)).reshape(w.shape)
    pw_escnn = (P @ w.reshape(-1)).reshape(w.shape)
    pen, eq = pk.penalty_and_energy(w, sym, backend="cpp")
    assert pen.dtype == eq.dtype == torch.float64
    assert float(pen) == pytest.approx(float((w - pw).square().sum()), rel=1e-10)
    assert float(eq) == pytest.approx(float(pw.square().sum()), rel=1e-10, abs=1e-12)
    assert float(pen) == pytest.approx(float((w - pw_escnn).square().sum()), rel=1e-5)
    got = pk.project(w, sym, backend="cpp")
    torch.testing.assert_close(got, pw, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, pw_escnn, rtol=0, atol=1e-5)
    table, geometry = _native(sym, w)
    gp, ge = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
    dw = OPS.steerable_penalty_energy_backward(w, gp, ge, table, geometry)
    torch.testing.assert_close(dw, 2 * 0.7 * (w - pw) + 2 * -1.3 * pw, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_cpp_agrees_with_the_reference_in_every_dtype(name, dtype):
    sym, _ = case(name)
    w = _random(sym, dtype, seed=22).requires_grad_()
    w64 = w.detach().double().requires_grad_()  # the same rounded values, in float64
    pen, eq = pk.penalty_and_energy(w, sym, backend="cpp")
    assert pen.dtype == eq.dtype == torch.float32
    rp, re_ = pk.penalty_and_energy(w64, sym, backend="reference")
    torch.testing.assert_close(pen.double(), rp.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eq.double(), re_.detach(), rtol=1e-5, atol=1e-6)
    g, = torch.autograd.grad(pen + 0.5 * eq, w)
    gr, = torch.autograd.grad(rp + 0.5 * re_, w64)
    assert g.dtype == dtype
    # element-wise results in the weight's dtype: one rounding of a float32 value each
    etol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=2e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
    torch.testing.assert_close(g.double(), gr, **etol)
    p = pk.project(w.detach(), sym, backend="cpp")
    assert p.dtype == dtype
    torch.testing.assert_close(p.double(), pk.project(w64.detach(), sym, backend="reference"), **etol)


def test_auto_picks_cpp_on_cpu_and_the_nodes_are_the_cpp_ones():
    sym, _ = case("o2_conv2d")
    w = _random(sym, seed=23).requires_grad_()
    assert config_on(w.shape, w.dtype, w.device, sym, "trivial", "trivial", "auto").backend.name == "cpp"
    pen = pk.projected_penalty(w, sym)
    assert "SteerPenaltyEnergyFn" in pen.grad_fn.name()
    assert "SteerProjectFn" in pk.project(w, sym).grad_fn.name()
    with torch.no_grad():
        assert pk.projected_penalty(w, sym).grad_fn is None


def test_auto_keeps_to_the_routes_that_have_run_on_a_gpu(monkeypatch):
    # backend="cuda" is opt-in until its kernels' GPU tests have passed: "auto" never picks it, even
    # where the extension has its CUDA kernels (made to look so here).
    from projkernels.backends import native, registry
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    native._register("cuda", lambda device: None)  # registered as an extension with CUDA kernels would be
    cuda = torch.device("cuda")
    assert registry.resolve("auto", cuda, "steerable").name in ("triton", "reference")
    assert registry.resolve("cuda", cuda, "steerable").name == "cuda"  # still there when named


# --- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["o2_conv2d", "so2_linear", "so3_conv3d"])
def test_gradcheck_and_double_backward(name):
    sym, _ = case(name)
    w = _random(sym, seed=24).requires_grad_()
    f = lambda x: pk.penalty_and_energy(x, sym, backend="cpp")  # noqa: E731
    proj = lambda x: pk.project(x, sym, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))
    assert torch.autograd.gradcheck(proj, (w,))
    assert torch.autograd.gradgradcheck(proj, (w,))
    # the backward op, in the weight and in both coefficients
    table, geometry = _native(sym, w)
    gp = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    ge = torch.tensor(-0.9, dtype=torch.float64, requires_grad=True)
    bwd = lambda x, a, b: OPS.steerable_penalty_energy_backward(x, a, b, table, geometry)  # noqa: E731
    assert torch.autograd.gradcheck(bwd, (w, gp, ge))
    # Hessian-vector product of the penalty: d/dW <2 (W - P W), V> = 2 (V - P V)
    v = _random(sym, seed=25)
    pen, _ = f(w)
    g, = torch.autograd.grad(pen, w, create_graph=True)
    hv, = torch.autograd.grad((g * v).sum(), w)
    torch.testing.assert_close(hv, 2 * (v - pk.project(v, sym, backend="reference")), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["so2_conv2d", "so3_conv3d", "so2_linear"])
def test_project_is_idempotent_and_escnn_weights_have_zero_penalty(name):
    sym, layer = case(name)
    w = _random(sym, seed=26)
    pw = pk.project(w, sym, backend="cpp")
    torch.testing.assert_close(pk.project(pw, sym, backend="cpp"), pw, rtol=0, atol=1e-13)
    layer = layer.double()
    e = _expand(layer, torch.randn(layer.weights.shape, generator=torch.Generator().manual_seed(27),
                                   dtype=torch.float64))
    pen, eq = pk.penalty_and_energy(e, sym, backend="cpp")
    total = float(e.square().sum())
    assert float(pen) <= 1e-10 * total
    assert float(eq) == pytest.approx(total, rel=1e-10)


def test_penalty_of_a_nearly_equivariant_weight_keeps_its_digits():
    sym, _ = case("so2_conv2d")
    w = _random(sym, seed=28)
    pw = pk.project(w, sym, backend="cpp")
    d = w - pw
    d = d / d.norm() * 1e-9
    assert float(pk.projected_penalty(pw + d, sym, backend="cpp")) == pytest.approx(1e-18, rel=1e-6)


# --- many blocks: the parallel split and its reproducibility ----------------------------------------

@pytest.mark.parametrize("make", [_many_blocks, _many_blocks_linear])
def test_many_blocks_agree_with_the_reference_and_do_not_depend_on_threads(make):
    sym = make()
    w = _random(sym, seed=29)
    table, geometry = _native(sym, w)
    assert _n_tiles(geometry) >= 8
    pen, eq = pk.penalty_and_energy(w, sym, backend="cpp")
    rp, re_ = pk.penalty_and_energy(w, sym, backend="reference")
    torch.testing.assert_close(pen, rp, rtol=1e-12, atol=0)
    torch.testing.assert_close(eq, re_, rtol=1e-12, atol=0)
    torch.testing.assert_close(pk.project(w, sym, backend="cpp"), pk.project(w, sym, backend="reference"),
                               rtol=0, atol=1e-12)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for _ in range(2):
                p, e = OPS.steerable_penalty_energy(w, table, geometry)
                dw = OPS.steerable_penalty_energy_backward(w, table[4], table[4], table, geometry)
                results.append((p, e, dw))
    finally:
        torch.set_num_threads(threads)
    for p, e, dw in results[1:]:  # bitwise: the partition into tiles is the layout's, not the threads'
        assert torch.equal(p, results[0][0]) and torch.equal(e, results[0][1]) and torch.equal(dw, results[0][2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_number_of_blocks_in_a_tile(dtype):
    # The CPU kernels compute a tile's blocks in row groups (as many as the target's registers hold,
    # then 4, 2, 1): every count of blocks in a tile, 1 to 30, and ranks of 1 to 2 columns (m = 3
    # or 18 entries, narrower and wider than a vector), so that no group size leaves a block out.
    gs = gspaces.rot2dOnR2(-1)
    for n_out in range(1, 31):
        out_type = enn.FieldType(gs, [gs.irrep(1)] * n_out)
        in_type = enn.FieldType(gs, [gs.irrep(0), gs.irrep(1)])
        for k in (1, 3):
            sym = pk.steerable(in_type, out_type, k)
            w = torch.randn(sym.weight_shape, dtype=dtype, generator=torch.Generator().manual_seed(n_out))
            ref = pk.project(w.double(), sym, backend="reference")
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(pk.project(w, sym, backend="cpp").double(), ref, rtol=tol, atol=tol,
                                       msg=f"{n_out} output fields, k={k}")
            p_ref = pk.projected_penalty(w.double(), sym, backend="reference")
            torch.testing.assert_close(pk.projected_penalty(w, sym, backend="cpp").double(), p_ref, rtol=10 * tol,
                                       atol=tol, msg=f"{n_out} output fields, k={k}")


def test_a_different_tiling_gives_the_same_values():
    """The layout's tiles (blocks per tile) change only how sums are grouped: one block per tile
    gives the same values up to rounding and the same element-wise outputs bit for bit."""
    sym = _many_blocks()
    w = _random(sym, seed=30)
    table, geometry = _native(sym, w)
    rows = [list(geometry[3 + 9 * i: 12 + 9 * i]) for i in range((len(geometry) - 3) // 9)]
    tile = 0
    for row in rows:
        row[7], row[8] = 1, tile
        tile += row[3] * row[4]
    assert tile > _n_tiles(geometry)
    geometry1 = list(geometry[:3]) + [v for row in rows for v in row]
    table1 = list(table)
    table1[2] = torch.tensor(rows, dtype=torch.long)
    p0, e0 = OPS.steerable_penalty_energy(w, table, geometry)
    p1, e1 = OPS.steerable_penalty_energy(w, table1, geometry1)
    torch.testing.assert_close(p1, p0, rtol=1e-13, atol=0)
    torch.testing.assert_close(e1, e0, rtol=1e-13, atol=0)
    assert torch.equal(OPS.steerable_project(w, table1, geometry1), OPS.steerable_project(w, table, geometry))


# --- the ops: opcheck, argument checks ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["o2_conv2d", "so2_linear"])
def test_opcheck(name, dtype):
    sym, _ = case(name)
    w = _random(sym, dtype, seed=31).requires_grad_(dtype == torch.float64)
    table, geometry = _native(sym, w)
    acc = pk.orbits.acc_dtype(dtype)
    gp = torch.tensor(0.75, dtype=acc, requires_grad=dtype == torch.float64)
    ge = torch.tensor(-0.5, dtype=acc)
    torch.library.opcheck(OPS.steerable_penalty_energy.default, (w, table, geometry))
    torch.library.opcheck(OPS.steerable_penalty_energy_backward.default, (w, gp, ge, table, geometry))
    torch.library.opcheck(OPS.steerable_project.default, (w, table, geometry))


def test_the_ops_check_their_arguments():
    sym, _ = case("so2_conv2d")
    w = _random(sym)
    table, geometry = _native(sym, w)
    with pytest.raises(RuntimeError, match=r"table must be \[q, fields, desc, zero, half, qt\]"):
        OPS.steerable_penalty_energy(w, table[:3], geometry)
    with pytest.raises(RuntimeError, match="geometry must be"):
        OPS.steerable_project(w, table, geometry[:-1])
    with pytest.raises(RuntimeError, match="weight has"):
        OPS.steerable_penalty_energy(w[:2], table, geometry)
    with pytest.raises(RuntimeError, match="q must be a contiguous 1-D tensor of the accumulation dtype"):
        OPS.steerable_penalty_energy(w.float(), table, geometry)  # a float64 layout for a float32 weight
    bad = list(geometry)
    bad[3 + 8 + 9] += 1  # the second type's first tile
    with pytest.raises(RuntimeError, match="starts at tile"):
        OPS.steerable_penalty_energy(w, table, bad)
    with pytest.raises(RuntimeError, match="grad_penalty must be a floating tensor holding one value"):
        OPS.steerable_penalty_energy_backward(w, torch.ones(2, dtype=torch.float64), table[3], table, geometry)


def test_backend_errors_name_the_backend():
    sym, _ = case("so2_conv2d")
    w = _random(sym)
    if not torch.cuda.is_available() or not C.WITH_CUDA:
        with pytest.raises(RuntimeError, match="backend='cuda' cannot serve this steerable symmetry on cpu"):
            pk.penalty_and_energy(w, sym, backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cpp' cannot serve this steerable symmetry on cuda"):
            pk.penalty_and_energy(w.cuda(), sym, backend="cpp")


# --- whole models, torch.compile ------------------------------------------------------------------

def test_multi_penalty_and_model_penalty_take_the_compiled_route():
    sym, _ = case("so2_conv2d")
    conv = torch.nn.Conv2d(4, 7, 5, bias=False).double()
    lin = torch.nn.Linear(8, 8, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(_random(sym, seed=32))
    pk.attach_symmetry(conv, sym)
    pk.attach_symmetry(lin, "C4", "regular", "regular")
    items = [(lin.weight, "C4", "regular", "regular"), (conv.weight, sym, "trivial", "trivial")]
    plan = pk.dispatch.multi.plan_for(pk.dispatch.multi_inputs.collect(items)[1], "auto")
    (cfg,) = plan.cfgs
    assert cfg.table is sym and cfg.backend.name == "cpp"
    total, _, per, _ = pk.multi_penalty(items)
    ref = pk.projected_penalty(conv.weight, sym, backend="reference")
    torch.testing.assert_close(per[1], ref.detach(), rtol=1e-12, atol=0)
    mp = pk.model_penalty(torch.nn.Sequential(conv, lin), bias=False)
    mp.backward()
    pw = pk.project(conv.weight.detach(), sym, backend="reference")
    torch.testing.assert_close(conv.weight.grad, 2 * (conv.weight.detach() - pw), rtol=0, atol=1e-12)


def test_compiles_in_one_graph_with_the_cpp_backend():
    sym, _ = case("o2_conv2d")
    w = _random(sym, seed=33).requires_grad_()

    def f(x):
        return pk.projected_penalty(x, sym, backend="cpp") + pk.project(x, sym, backend="cpp").square().sum()
    got = torch.compile(f, fullgraph=True, backend="eager")(w)
    want = f(w)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    g1, = torch.autograd.grad(got, w)
    g2, = torch.autograd.grad(want, w)
    torch.testing.assert_close(g1, g2)


# --- CUDA against the CPU kernels -------------------------------------------------------------------

def _big_q_case():
    """SO(3) conv3d with l = 2 fields and a 5^3 kernel: Q_t of the (2, 2) pair is m = 3125 rows, too
    large for a CUDA block's 48 KiB of shared memory, so the kernel reads it from global memory."""
    gs = gspaces.rot3dOnR3()
    t = enn.FieldType(gs, [gs.irrep(2), gs.irrep(1)])
    return pk.steerable(t, t, 5)


def _gpu_ready():
    if not (torch.cuda.is_available() and C.WITH_CUDA):
        pytest.skip("needs a GPU and projkernels._C built with CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES + ["many", "big_q"])
def test_cuda_agrees_with_cpp(name, dtype):
    _gpu_ready()
    sym = {"many": _many_blocks, "big_q": _big_q_case}.get(name, lambda: case(name)[0])()
    if name == "big_q":
        (t,) = [t for t in sym.types if t.d_out == t.d_in == 5]
        assert t.m * t.rank * 4 > 48 * 1024
    w = _random(sym, dtype, seed=34)
    wc = w.cuda().requires_grad_()
    w = w.requires_grad_()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    etol = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=1e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
    pc, ec = pk.penalty_and_energy(w, sym, backend="cpp")
    pg, eg = pk.penalty_and_energy(wc, sym)  # auto: cuda
    assert pg.device.type == "cuda" and pg.dtype == pc.dtype
    assert "SteerPenaltyEnergyFn" in pg.grad_fn.name()
    torch.testing.assert_close(pg.cpu(), pc, **tol)
    torch.testing.assert_close(eg.cpu(), ec, **tol)
    gc, = torch.autograd.grad(pc + 0.5 * ec, w)
    gg, = torch.autograd.grad(pg + 0.5 * eg, wc)
    assert gg.dtype == dtype
    torch.testing.assert_close(gg.cpu().double(), gc.double(), **etol)
    proj = pk.project(wc.detach(), sym, backend="cuda")
    torch.testing.assert_close(proj.cpu().double(), pk.project(w.detach(), sym, backend="cpp").double(), **etol)
    # bitwise reproducible on the GPU
    again = pk.penalty_and_energy(wc.detach(), sym, backend="cuda")
    assert torch.equal(again[0], pg.detach()) and torch.equal(again[1], eg.detach())


@pytest.mark.gpu
def test_cuda_opcheck_and_double_backward():
    _gpu_ready()
    sym, _ = case("o2_conv2d")
    w = _random(sym, seed=35).cuda().requires_grad_()
    table, geometry = _native(sym, w)
    gp = torch.tensor(0.75, dtype=torch.float64, device="cuda")
    torch.library.opcheck(OPS.steerable_penalty_energy.default, (w, table, geometry))
    torch.library.opcheck(OPS.steerable_penalty_energy_backward.default, (w, gp, gp, table, geometry))
    torch.library.opcheck(OPS.steerable_project.default, (w, table, geometry))
    assert torch.autograd.gradgradcheck(lambda x: pk.penalty_and_energy(x, sym, backend="cuda"), (w,))
