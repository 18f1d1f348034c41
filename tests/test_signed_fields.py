"""Field types given by signed permutations (projkernels/reps.py), on every route.

The oracle (tests/cases.py) averages Pi_g(W) = rho_out(g) T_g(W) rho_in(g)^T built densely from
matrices taken from escnn's own groups (``cyclic_group``, ``dihedral_group``, ``octa_group``,
``full_octa_group``), never from projkernels' closed forms or orbit tables, so a wrong sign, a wrong
basis or a wrong orbit cannot agree with it.  An implementation that ignored the signs would see
the C4 vector rep as a permutation rep: escnn's equivariant vector -> vector weights then have a
penalty far from 0 (``test_signs_matter``), and the oracle comparisons fail.
"""
import ast

import numpy as np
import pytest
import torch
from torch import nn

import projkernels as pk
from projkernels.orbits import orbit_table
from projkernels.reps import rep_names, side_of

from cases import TRITON_DEVICE, Oracle

escnn_group = pytest.importorskip("escnn.group")

ALIASES = {("C4", "vector"): "irrep_1", ("C4", "sign"): "irrep_2", ("D4", "vector"): "irrep_1,1",
           ("D4", "pseudoscalar"): "irrep_1,0", ("O", "vector"): "irrep_1", ("T", "vector"): "irrep_1",
           ("Oh", "vector"): "irrep_[(1,),(1,)](0)", ("Oh", "pseudovector"): "irrep_[(0,),(1,)](0)",
           ("Oh", "pseudoscalar"): "irrep_[(1,),(0,)](0)"}


def _escnn(group):
    if group[0] == "C":
        return escnn_group.cyclic_group(int(group[1:]))
    if group[0] == "D":
        return escnn_group.dihedral_group(int(group[1:]))
    return {"O": escnn_group.octa_group, "Oh": escnn_group.full_octa_group}[group]()


def escnn_matrices(group, name):
    """[|G|, n, n] rho(g) of escnn's rep ``name`` (or of the rep our alias names), in escnn's element order."""
    name = ALIASES.get((group, name), name)
    E = _escnn(group)
    if name == "trivial":
        rep = E.trivial_representation
    elif name == "regular":
        rep = E.regular_representation
    elif name.startswith("quotient["):
        rep = E.quotient_representation(ast.literal_eval(name[len("quotient["):-1]))
    else:
        rep = {ir.name: ir for ir in E.irreps()}[name]
    return np.stack([np.asarray(rep(e), dtype=np.float64) for e in E.elements])


def side_matrices(group, side):
    """A side as the oracle takes it: a name (C copies) or the block-diagonal matrices of a direct sum."""
    if isinstance(side, str):
        return escnn_matrices(group, side)
    blocks = [escnn_matrices(group, n) for n in side]
    return np.stack([np.asarray(torch.block_diag(*[torch.as_tensor(b[g]) for b in blocks]))
                     for g in range(blocks[0].shape[0])])


# (group, shape, in_rep, out_rep): Linear, Conv1d, Conv2d (odd and even k), Conv3d; direct sums mixed
# with trivial and regular fields; free actions (a regular side) and orbits with both signs.
CASES = [
    ("C4", (2, 2, 3, 3), "vector", "vector"),
    ("C4", (4, 6, 3, 3), ["vector", "sign", "sign", "trivial", "trivial"], "vector"),
    ("C4", (4, 8, 2, 2), "quotient[2]", "vector"),
    ("C4", (8, 2, 3, 3), "vector", "regular"),
    ("C4", (2, 8, 3, 3), "regular", "vector"),
    ("C4", (3, 4), "vector", ["sign", "trivial", "sign"]),
    ("C4", (1, 6, 1, 1), "sign", "trivial"),
    ("C2", (2, 3, 3), "irrep_1", "irrep_1"),
    ("D4", (2, 2, 3, 3), "vector", "vector"),
    ("D4", (1, 4, 3, 3), "vector", "irrep_1,2"),
    ("D4", (2, 1, 3, 3), "pseudoscalar", "irrep_0,2"),
    ("D4", (3, 3, 5, 5), "irrep_1,0", ["irrep_1,2", "irrep_0,2", "irrep_1,0"]),
    ("D4", (4, 4, 3, 3), "quotient[(0, 1)]", "quotient[(None, 2)]"),
    ("D4", (11, 3, 3, 3), ["vector", "trivial"], ["regular", "vector", "pseudoscalar"]),
    ("D4", (6, 10), ["regular", "vector"], "vector"),
    ("D2", (2, 2, 3), "irrep_1,1", "irrep_0,1"),
    ("O", (3, 3, 3, 3, 3), "vector", "vector"),
    ("O", (3, 2, 2, 2, 2), "trivial", "irrep_-1"),
    ("Oh", (3, 3, 3, 3, 3), "vector", "pseudovector"),
    ("Oh", (4, 3, 3, 3, 3), "pseudovector", ["vector", "pseudoscalar"]),
    ("C8", (3, 5), "irrep_4", "irrep_4"),
    ("C100", (2, 3), "irrep_50", "trivial"),   # above the array classes: the streamed kernels, with signs
]


def cid(case):
    group, shape, ir, orr = case
    rep = lambda r: r if isinstance(r, str) else "+".join(r)  # noqa: E731
    return f"{group}-{'x'.join(map(str, shape))}-{rep(ir)}-{rep(orr)}"


def weight_for(case, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + len(cid(case)))
    return torch.randn(case[1], generator=g, dtype=torch.float64).to(dtype)


def oracle(case, w):
    group, _, ir, orr = case
    return Oracle(w, group, side_matrices(group, ir), side_matrices(group, orr))


BACKENDS = ["reference", "cpp"] + (["triton"] if TRITON_DEVICE == "cpu" else [])


def _backend_or_skip(backend):
    if backend not in pk.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here")


# --- the reps themselves --------------------------------------------------------------------------

@pytest.mark.parametrize("group", ["C2", "C4", "C8", "D1", "D2", "D4", "O", "Oh"])
def test_builtin_reps_are_escnns(group):
    names = [n for n in rep_names(group) if n not in ("trivial", "regular") and not n.startswith("irrep_0")
             and n != "irrep_[(0,),(0,)](0)"]
    assert names, group
    G = pk.get_group(group)
    for name in names:
        ours = side_of(G, name).rep.matrices()
        np.testing.assert_array_equal(ours, np.rint(escnn_matrices(group, name)), err_msg=f"{group} {name}")
        np.testing.assert_allclose(ours, escnn_matrices(group, name), atol=1e-9)


def test_the_required_names_exist():
    for group, names in {"C4": ["irrep_1", "irrep_2", "vector", "sign", "quotient[2]"],
                         "D4": ["irrep_1,0", "irrep_1,1", "irrep_1,2", "irrep_0,2", "vector", "pseudoscalar",
                                "quotient[(0, 1)]"],
                         "O": ["irrep_1", "vector"], "Oh": ["vector", "pseudovector", "irrep_[(1,),(1,)](0)"]}.items():
        assert set(names) <= set(rep_names(group)), group
    # Every irrep of D4 is a signed permutation, and is built in.
    assert {ir.name for ir in _escnn("D4").irreps()} - {"irrep_0,0"} <= set(rep_names("D4"))
    # The cube's vector rep is the rotation matrices themselves (in escnn's (y, z, x) basis).
    R = pk.get_group("O").matrices[:, [1, 2, 0]][:, :, [1, 2, 0]]
    np.testing.assert_array_equal(side_of(pk.get_group("O"), "vector").rep.matrices(), R)


# --- every backend against the oracle --------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_matches_the_oracle(case, backend):
    _backend_or_skip(backend)
    if backend == "triton" and torch.Size(case[1]).numel() > 400:
        pytest.skip("the Triton interpreter is slow: the small cases cover its sign handling")
    group, shape, ir, orr = case
    w = weight_for(case)
    o = oracle(case, w)
    t = orbit_table(w, group, ir, orr)
    # The kernels take the signed path only where a field's matrices hold a -1 (sign x sign, C2's
    # irrep_1 on both sides, acts with sign +1 on every entry: an unsigned table).
    one_side = [(side_matrices(group, r) < -0.5).any() for r in (ir, orr)]
    if not any(one_side):
        assert not t.signed
    elif not all(one_side):
        assert t.signed
    x = w.clone().requires_grad_(True)
    pen, eq = pk.penalty_and_energy(x, group, ir, orr, backend=backend)
    torch.testing.assert_close(pen, o.penalty, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eq, o.energy, rtol=1e-10, atol=1e-10)
    gp, = torch.autograd.grad(pen, x, retain_graph=True)
    ge, = torch.autograd.grad(eq, x)
    torch.testing.assert_close(gp, o.grad_penalty, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ge, o.grad_energy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pk.project(w, group, ir, orr, backend=backend), o.p, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pk.spectrum(w, group, ir, orr, backend=backend), o.spectrum, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[13], CASES[18]], ids=cid)
def test_cpp_matches_the_reference_in_low_precision(case, dtype):
    _backend_or_skip("cpp")
    group, _, ir, orr = case
    w = weight_for(case, dtype)
    for f in (pk.projected_penalty, pk.equivariant_energy):
        torch.testing.assert_close(f(w, group, ir, orr, backend="cpp"), f(w, group, ir, orr, backend="reference"),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pk.project(w, group, ir, orr, backend="cpp").double(),
                               pk.project(w, group, ir, orr, backend="reference").double(), rtol=1e-2, atol=1e-2)


def test_values_near_the_largest_float32_take_the_rescaled_paths():
    _backend_or_skip("cpp")
    case = CASES[0]
    w = (weight_for(case).sign() * 3e38).float()
    w[0, 0] = -w[0, 0]
    for f in (pk.projected_penalty, pk.equivariant_energy, pk.project):
        a, b = f(w, "C4", "vector", "vector", backend="cpp"), f(w, "C4", "vector", "vector", backend="reference")
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=0)
    assert torch.isfinite(pk.project(w, "C4", "vector", "vector", backend="cpp")).all()


def test_multi_penalty_and_decay_read_the_signs():
    _backend_or_skip("cpp")
    items = [(weight_for(c), c[0], c[2], c[3]) for c in (CASES[1], CASES[4], CASES[13], CASES[18], CASES[21])]
    for backend in ("reference", "cpp"):
        pen, eq, per_pen, per_eq = pk.multi_penalty(items, backend=backend)
        for (w, *spec), p, e, case in zip(items, per_pen, per_eq,
                                          (CASES[1], CASES[4], CASES[13], CASES[18], CASES[21])):
            o = oracle(case, w)
            torch.testing.assert_close(p, o.penalty, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(e, o.energy, rtol=1e-10, atol=1e-10)
    # The decay: one decoupled step moves W to W - lr 2 lambda (W - P W).
    for backend in ("reference", "cpp"):
        model = nn.Sequential(nn.Conv2d(6, 4, 3, bias=False), nn.Conv2d(4, 2, 3, bias=False))
        pk.attach_symmetry(model[0], "C4", ["vector", "sign", "sign", "trivial", "trivial"], "vector")
        pk.attach_symmetry(model[1], "C4", "vector", "vector")
        with torch.no_grad():
            model[0].weight.copy_(weight_for(CASES[1]).float())
            model[1].weight.copy_(torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3)))
        before = [m.weight.detach().double().clone() for m in model]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = pk.equivariance_decay(opt, model, lambda_perp=1.0, backend=backend)
        opt.step()
        handle.remove()
        for m, w0, (ir, orr) in zip(model, before, [(["vector", "sign", "sign", "trivial", "trivial"], "vector"),
                                                    ("vector", "vector")]):
            o = Oracle(w0, "C4", side_matrices("C4", ir), side_matrices("C4", orr))
            torch.testing.assert_close(m.weight.detach().double(), w0 - 0.1 * o.grad_penalty, rtol=1e-5, atol=1e-5)


# --- escnn's equivariant weights -------------------------------------------------------------------

enn = pytest.importorskip("escnn.nn")
gspaces = pytest.importorskip("escnn.gspaces")


def _r2(gs, fin, fout, k=3, seed=0):
    torch.manual_seed(seed)
    conv = enn.R2Conv(enn.FieldType(gs, fin), enn.FieldType(gs, fout), k).double()
    with torch.no_grad():
        conv.weights.normal_()
    return conv


def _irrep(gs, name):
    return {ir.name: ir for ir in gs.fibergroup.irreps()}[name]


def _check_escnn_weight(conv, kind_check=True):
    from projkernels.escnn_interop import symmetry_from_r2conv, symmetry_from_r3conv
    from_conv = symmetry_from_r3conv if isinstance(conv, enn.R3Conv) else symmetry_from_r2conv
    sym = from_conv(conv, kind="group_average")
    w, _ = conv.expand_parameters()
    w = w.detach()
    for backend in ("reference", "cpp"):
        pen = pk.projected_penalty(w, sym.group, sym.in_rep, sym.out_rep, backend=backend)
        assert float(pen) <= 1e-20 + 1e-12 * float(w.square().sum()), (backend, sym, float(pen))
    rand = torch.randn_like(w)
    assert float(pk.projected_penalty(rand, sym.group, sym.in_rep, sym.out_rep)) > 0.05 * float(rand.square().sum())
    return sym, w


def test_escnn_r2conv_weights_have_penalty_zero():
    c4 = gspaces.rot2dOnR2(4)
    G = c4.fibergroup
    v, s = _irrep(c4, "irrep_1"), _irrep(c4, "irrep_2")
    q = G.quotient_representation(2)
    cases = [([v], [v]), ([v, v], [v, s]), ([s], [v]), ([q, c4.trivial_repr], [v]),
             ([c4.regular_repr, v], [v, c4.trivial_repr, c4.regular_repr])]
    for fin, fout in cases:
        sym, _ = _check_escnn_weight(_r2(c4, fin, fout))
        assert sym.group == "C4"
    sym, _ = _check_escnn_weight(_r2(c4, [v, v], [v, v]))
    assert (sym.in_rep, sym.out_rep) == ("irrep_1", "irrep_1")
    d4 = gspaces.flipRot2dOnR2(4)
    irr = [_irrep(d4, n) for n in ("irrep_1,0", "irrep_1,1", "irrep_1,2", "irrep_0,2")]
    qd = d4.fibergroup.quotient_representation((0, 1))
    for fin, fout in [(irr, irr[::-1]), ([irr[1]], [irr[1], qd]), ([qd, d4.trivial_repr], [irr[0], irr[3]])]:
        sym, _ = _check_escnn_weight(_r2(d4, fin, fout, k=5))
        assert sym.group == "D4"


def test_signs_matter():
    # The C4 vector rep with its signs dropped is a permutation rep (r -> swap, r^2 -> 1): a
    # representation, but another one.  escnn's vector -> vector weights are not equivariant under it.
    G = pk.get_group("C4")
    unsigned = np.abs(side_of(G, "vector").rep.matrices())
    pk.register_rep("C4", "unsigned_vector_for_tests", unsigned)
    c4 = gspaces.rot2dOnR2(4)
    v = _irrep(c4, "irrep_1")
    conv = _r2(c4, [v, v], [v])
    w, _ = conv.expand_parameters()
    w = w.detach()
    norm = float(w.square().sum())
    for backend in ("reference", "cpp"):
        assert float(pk.projected_penalty(w, "C4", "vector", "vector", backend=backend)) < 1e-12 * norm
        bad = float(pk.projected_penalty(w, "C4", "unsigned_vector_for_tests", "unsigned_vector_for_tests",
                                         backend=backend))
        assert bad > 0.05 * norm, backend


def _r3(gs, fin, fout, seed=0):
    torch.manual_seed(seed)
    conv = enn.R3Conv(enn.FieldType(gs, fin), enn.FieldType(gs, fout), 3).double()
    with torch.no_grad():
        conv.weights.normal_()
    return conv


def test_escnn_r3conv_weights_have_penalty_zero():
    o = gspaces.octaOnR3()
    v = _irrep(o, "irrep_1")
    sym, _ = _check_escnn_weight(_r3(o, [v], [v, o.trivial_repr]))
    assert sym.group == "O"
    oh = gspaces.fullOctaOnR3()
    vec, pv = _irrep(oh, "irrep_[(1,),(1,)](0)"), _irrep(oh, "irrep_[(0,),(1,)](0)")
    sym, w = _check_escnn_weight(_r3(oh, [vec], [pv]))
    assert (sym.group, sym.in_rep, sym.out_rep) == ("Oh", "vector", "pseudovector") or sym.in_rep == "irrep_[(1,),(1,)](0)"
    # vector -> pseudovector is not vector -> vector: the determinant's sign is read.
    assert float(pk.projected_penalty(w, "Oh", "vector", "vector")) > 0.05 * float(w.square().sum())


# --- registered reps, biases, errors ------------------------------------------------------------

def test_a_registered_rep_serves_every_route():
    # The C4 vector rep in the basis (u, -v): rho'(g) = P rho(g) P, P = diag(1, -1).
    G = pk.get_group("C4")
    P = np.diag([1.0, -1.0])
    mats = P @ escnn_matrices("C4", "irrep_1") @ P
    pk.register_rep("C4", "flipped_vector_for_tests", mats)
    pk.register_rep("C4", "flipped_vector_for_tests", mats)  # the same matrices again: accepted
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    o = Oracle(w, "C4", escnn_matrices("C4", "irrep_1"), mats)
    for backend in ("reference", "cpp"):
        torch.testing.assert_close(pk.projected_penalty(w, G, "vector", "flipped_vector_for_tests", backend=backend),
                                   o.penalty, rtol=1e-10, atol=1e-10)
    m = nn.Conv2d(2, 4, 3)
    pk.attach_symmetry(m, "C4", "vector", "flipped_vector_for_tests")
    assert "flipped_vector_for_tests" in pk.format_report(pk.equivariance_report(m))
    with pytest.raises(ValueError, match="name: a different field type"):
        pk.register_rep("C4", "flipped_vector_for_tests", escnn_matrices("C4", "irrep_1"))


def test_bias_projects_onto_the_fixed_space():
    for out_rep, keep in [("vector", [0, 0]), (["vector", "trivial", "sign"], [0, 0, 1, 0]),
                          ("quotient[2]", None), ("pseudoscalar", [0])]:
        group = "D4" if out_rep == "pseudoscalar" else "C4"
        size = len(keep) if keep else 2
        m = nn.Conv2d(1, 2 * size if isinstance(out_rep, str) else size, 3)
        pk.attach_symmetry(m, group, "trivial", out_rep)
        with torch.no_grad():
            m.weight.zero_()
            m.bias.copy_(torch.arange(1.0, m.bias.numel() + 1))
        b = m.bias.detach().double().clone()
        if keep is None:  # quotient[2] is a permutation rep: the field means
            expected = b.view(-1, 2).mean(dim=1, keepdim=True).expand(-1, 2).reshape(-1)
        else:
            mask = torch.tensor(keep * (b.numel() // len(keep)), dtype=torch.float64)
            expected = b * mask
        torch.testing.assert_close(pk.model_penalty(m).double(), (b - expected).square().sum(), rtol=1e-6, atol=1e-6)
        pk.project_(m)
        torch.testing.assert_close(m.bias.detach().double(), expected, rtol=1e-6, atol=1e-6)


def test_errors_name_the_argument():
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="in_rep: unknown representation 'vektor'"):
        pk.projected_penalty(w, "C4", "vektor", "vector")
    with pytest.raises(TypeError, match=r"out_rep\[1\]: expected a field type name"):
        pk.projected_penalty(w, "C4", "vector", ["trivial", 3])
    with pytest.raises(ValueError, match="weight: dim 0"):
        pk.projected_penalty(torch.randn(3, 2, 3, 3), "C4", "vector", "vector")
    with pytest.raises(ValueError, match=r"weight: dim 1 \(in channels\) must be 3"):
        pk.projected_penalty(w, "C4", ["vector", "trivial"], "vector")
    with pytest.raises(ValueError, match="in_rep: unknown representation 'vector' of C8"):
        pk.projected_penalty(torch.randn(2, 2), "C8", "vector", "trivial")
    c8 = escnn_matrices("C8", "irrep_1")  # rotations by 45 degrees: not signed permutations
    with pytest.raises(ValueError, match="matrices: every rho"):
        pk.register_rep("C8", "rot45", c8)
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="matrices: the matrices are not a representation of C4"):
        pk.register_rep("C4", "not_a_hom", np.stack([np.eye(2), swap, swap, swap]))
    with pytest.raises(ValueError, match="matrices: expected 4 matrices"):
        pk.register_rep("C4", "too_few", np.stack([np.eye(2)] * 3))
    with pytest.raises(ValueError, match="name: 'vector' is a built-in"):
        pk.register_rep("C4", "vector", escnn_matrices("C4", "irrep_1"))
    m = nn.Conv2d(3, 2, 3)
    with pytest.raises(ValueError, match="weight: dim 1"):
        pk.attach_symmetry(m, "C4", "vector", "vector")
    with pytest.raises(ValueError, match=r"items\[0\]: .*in_rep"):
        pk.multi_penalty([(w, "C4", "nope", "vector")])


def test_escnn_export_reads_the_group_average_with_the_steerable_bias_projection():
    # "auto" reads D4's signed-permutation fields as the group average; its bias projection (onto the
    # fixed space of rho_out) is the steerable route's (onto the trivial-isotypic part), field by field.
    from projkernels.escnn_interop import from_escnn_export
    d4 = gspaces.flipRot2dOnR2(4)
    out = [d4.regular_repr, _irrep(d4, "irrep_1,1"), d4.trivial_repr, _irrep(d4, "irrep_1,0")]
    layer = _r2(d4, [d4.trivial_repr], out)
    auto = from_escnn_export(enn.SequentialModule(layer))[0]
    steer = from_escnn_export(enn.SequentialModule(layer), kind="steerable")[0]
    assert pk.get_symmetry(auto).group == "D4"
    b = torch.randn(auto.bias.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        auto.bias.copy_(b)
        steer.bias.copy_(b)
    want = float(pk.model_penalty(nn.Sequential(steer)))
    assert want > 0.1
    assert float(pk.model_penalty(nn.Sequential(auto))) == pytest.approx(want, rel=1e-9)
