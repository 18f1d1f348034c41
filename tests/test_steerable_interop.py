"""escnn layers on any gspace and field types: steerable symmetries read off the layers, and biases.

The oracles are independent of projkernels' block layout and of the change of basis it reads:
a layer's space is the span of its own expansion of every unit coefficient vector (QR), and the
equivariant biases are built from the group's action itself (the average of rho(g) over a finite
group, over enough rotations for SO(2), or the vectors that generic elements fix).
"""
import functools
import math
import os

import numpy as np
import pytest
import torch

if os.environ.get("PROJKERNELS_REQUIRE_ESCNN") == "1":
    import escnn  # noqa: F401  (CI sets the variable: there these checks must run, not skip)
else:
    escnn = pytest.importorskip("escnn", reason="escnn is an optional test dependency (pip install '.[escnn]')")
from escnn import gspaces, nn as enn  # noqa: E402
from escnn.group import so2_group  # noqa: E402

import projkernels as pk  # noqa: E402
from projkernels.escnn_interop import (from_escnn_export, steerable_from_layer, symmetries_from_escnn,  # noqa: E402
                                       symmetry_from_linear, symmetry_from_r2conv, symmetry_from_r3conv)
from projkernels.model import Symmetry, attached_layers, get_symmetry  # noqa: E402
from projkernels.symmetry.steerable import SteerableSymmetry  # noqa: E402


def _small_radius(d):
    # a custom basis filter: drop the outermost ring (any deterministic rule will do)
    return d["radius"] < 1.5


def _layer(name):
    """An escnn layer with non-default basis options, so that carrying the options over matters."""
    if name == "so2_irreps":
        gs = gspaces.rot2dOnR2(-1)
        fi = enn.FieldType(gs, [gs.irrep(0), gs.irrep(1), gs.irrep(0)])
        fo = enn.FieldType(gs, [gs.irrep(1), gs.irrep(2), gs.irrep(0)])
        return enn.R2Conv(fi, fo, 5, sigma=0.45, frequencies_cutoff=1.5, rings=[0.0, 1.0, 2.0], dilation=2)
    if name == "o2_irreps":
        gs = gspaces.flipRot2dOnR2(-1)
        fi = enn.FieldType(gs, [gs.irrep(0, 0), gs.irrep(1, 1), gs.irrep(1, 0)])
        fo = enn.FieldType(gs, [gs.irrep(1, 2), gs.irrep(1, 1), gs.irrep(0, 0)])
        return enn.R2Conv(fi, fo, 5, basis_filter=_small_radius, frequencies_cutoff=2.0)
    if name == "o2_mixed":
        gs = gspaces.flipRot2dOnR2(-1)
        reg = gs.fibergroup.bl_regular_representation(2)  # a direct sum of irreps with a change of basis
        fi = enn.FieldType(gs, [gs.trivial_repr, reg])
        fo = enn.FieldType(gs, [reg, gs.irrep(1, 1), gs.irrep(0, 0), reg])
        return enn.R2Conv(fi, fo, 3, sigma=0.5)
    if name == "c8_regular":  # a finite group that does not act exactly on a 3x3 grid
        gs = gspaces.rot2dOnR2(8)
        ft = enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr])
        return enn.R2Conv(ft, ft, 3, maximum_offset=0)
    if name == "so3_irreps":
        gs = gspaces.rot3dOnR3()
        fi = enn.FieldType(gs, [gs.irrep(0), gs.irrep(1)])
        fo = enn.FieldType(gs, [gs.irrep(1), gs.irrep(0), gs.irrep(2)])
        return enn.R3Conv(fi, fo, 3, sigma=0.5)
    if name == "so2_linear":
        G = so2_group(3)
        gs = gspaces.no_base_space(G)
        fi = enn.FieldType(gs, [G.irrep(0), G.irrep(1), G.irrep(2), G.irrep(1)])
        fo = enn.FieldType(gs, [G.irrep(1), G.irrep(0), G.irrep(3), G.bl_regular_representation(2)])
        return enn.Linear(fi, fo)
    raise KeyError(name)


LAYERS = ["so2_irreps", "o2_irreps", "o2_mixed", "c8_regular", "so3_irreps", "so2_linear"]
_READ = {"R2Conv": symmetry_from_r2conv, "R3Conv": symmetry_from_r3conv, "Linear": symmetry_from_linear}


def _random_coefficients(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weights.copy_(torch.randn(layer.weights.shape, generator=g, dtype=torch.float64))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=torch.float64))


def _dense_projection(layer):
    """P (N x N, float64) onto the span of the layer's expansion of every unit coefficient vector."""
    n = layer.weights.numel()
    cols = []
    with torch.no_grad():
        saved = layer.weights.detach().clone()
        for i in range(n):
            layer.weights.copy_(torch.eye(n, dtype=torch.float64)[i])
            cols.append(layer.expand_parameters()[0].detach().reshape(-1).clone())
        layer.weights.copy_(saved)
    q, r = torch.linalg.qr(torch.stack(cols, 1))
    q = q[:, r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()]
    return q @ q.T


@pytest.mark.parametrize("name", LAYERS)
def test_the_layer_weight_has_zero_penalty_and_the_same_space(name):
    layer = _layer(name).double()
    _random_coefficients(layer, seed=0)
    sym = _READ[type(layer).__name__](layer).group
    assert isinstance(sym, SteerableSymmetry)
    w = layer.expand_parameters()[0].detach()
    assert tuple(w.shape) == sym.weight_shape
    total = float(w.square().sum())
    assert float(pk.projected_penalty(w, sym)) <= 1e-10 * total
    # the symmetry's space is the layer's own: its dense projection, independently built
    P = _dense_projection(layer)
    q = sym.dense_basis()
    # P expands escnn's float32 samples, the symmetry samples the same analytic basis in float64
    torch.testing.assert_close(q @ q.T, P, rtol=0, atol=1e-6)
    if name in ("so2_irreps", "o2_irreps", "so3_irreps"):
        # non-vacuous: with escnn's default options the layer would span another space
        qd = pk.steerable(layer.in_type, layer.out_type, layer.kernel_size).dense_basis()
        assert float((qd @ qd.T - P).norm()) > 0.1  # against ~1e-7 above


def test_kind_chooses_between_the_group_average_and_the_layer_basis():
    gs = gspaces.rot2dOnR2(4)
    reg = enn.FieldType(gs, 2 * [gs.regular_repr])
    conv = enn.R2Conv(reg, reg, 3).double()
    assert symmetry_from_r2conv(conv) == Symmetry("C4", "regular", "regular")  # today's default
    assert symmetry_from_r2conv(conv, kind="group_average") == Symmetry("C4", "regular", "regular")
    steer = symmetry_from_r2conv(conv, kind="steerable")
    assert isinstance(steer.group, SteerableSymmetry) and (steer.in_rep, steer.out_rep) == ("trivial", "trivial")
    w = conv.expand_parameters()[0].detach()
    assert float(pk.projected_penalty(w, steer.group)) <= 1e-10 * float(w.square().sum())
    # escnn's band-limited span lies inside the grid-equivariant space: a random weight's group-average
    # projection is penalised by the steerable symmetry
    v = pk.project(torch.randn(w.shape, dtype=torch.float64), "C4", "regular", "regular")
    assert float(pk.projected_penalty(v, steer.group)) > 1e-3 * float(v.square().sum())
    # "auto" reads the layer's basis where the group average does not apply
    so2 = gspaces.rot2dOnR2(-1)
    irr = enn.FieldType(so2, [so2.irrep(1), so2.irrep(0)])
    assert isinstance(symmetry_from_r2conv(enn.R2Conv(irr, irr, 3)).group, SteerableSymmetry)
    assert isinstance(symmetry_from_r2conv(_layer("c8_regular")).group, SteerableSymmetry)
    with pytest.raises(ValueError, match="kind: expected one of"):
        symmetries_from_escnn(enn.SequentialModule(conv), kind="steer")
    with pytest.raises(ValueError, match="enc: grouped convolutions"):
        g2 = enn.FieldType(so2, 2 * [so2.irrep(1)])
        steerable_from_layer(enn.R2Conv(g2, g2, 3, groups=2), "enc")
    with pytest.raises(TypeError, match="escnn.nn.Linear"):
        symmetry_from_linear(conv)


def test_layers_with_one_basis_share_one_symmetry():
    a, b = _layer("so2_irreps"), _layer("so2_irreps").double()
    assert steerable_from_layer(a) is steerable_from_layer(b)  # float32 and float64 copies of one basis
    c = enn.R2Conv(a.in_type, a.out_type, 5, sigma=0.45, frequencies_cutoff=1.5, rings=[0.0, 1.0, 2.0])
    assert steerable_from_layer(c) is not steerable_from_layer(a)  # another dilation: another grid


def _so2_model():
    so2 = gspaces.rot2dOnR2(-1)
    t_in = enn.FieldType(so2, [so2.trivial_repr])
    t_irr = enn.FieldType(so2, 2 * [so2.irrep(0), so2.irrep(1), so2.irrep(2)])
    t_sc = enn.FieldType(so2, 4 * [so2.trivial_repr])
    t_out = enn.FieldType(so2, [so2.irrep(1), so2.irrep(0), so2.irrep(1)])
    return enn.SequentialModule(
        enn.R2Conv(t_in, t_irr, 5, padding=2, frequencies_cutoff=1.5, sigma=0.5),
        enn.R2Conv(t_irr, t_sc, 3, padding=1),
        enn.ReLU(t_sc),
        enn.PointwiseMaxPool2D(t_sc, 2),
        enn.R2Conv(t_sc, t_out, 3, padding=1, rings=[0.0, 1.0]))


def test_export_of_a_continuous_group_model():
    torch.manual_seed(0)
    net = _so2_model().double()
    for m in net.modules():
        if isinstance(m, enn.R2Conv):
            _random_coefficients(m, seed=len(m.out_type))
    plain = from_escnn_export(net)
    assert [n for n, _, _ in attached_layers(plain)] == ["0", "1", "4"]
    assert all(isinstance(s.group, SteerableSymmetry) for _, _, s in attached_layers(plain))
    # the export computes what the escnn model computes
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    net.eval()
    torch.testing.assert_close(plain(x), net(net.in_type(x)).tensor)
    # weights and biases (escnn's biases sit on the trivial irreps) carry no penalty ...
    sq = sum(float(m.weight.detach().square().sum()) for _, m, _ in attached_layers(plain))
    assert plain[0].bias is not None and float(plain[0].bias.detach().abs().max()) > 0.1
    assert float(pk.model_penalty(plain).detach()) <= 1e-10 * sq
    # ... until a weight, or a bias, is perturbed
    with torch.no_grad():
        plain[1].weight.add_(1e-2 * torch.randn_like(plain[1].weight))
    p_weight = float(pk.model_penalty(plain).detach())
    assert p_weight > 1e-7 * sq
    with torch.no_grad():
        plain[0].bias.add_(1e-2 * torch.randn_like(plain[0].bias))
    assert float(pk.model_penalty(plain).detach()) > p_weight + 1e-6
    assert float(pk.model_penalty(plain, bias=False).detach()) == pytest.approx(p_weight, rel=1e-12)
    pk.project_(plain)
    assert float(pk.model_penalty(plain).detach()) <= 1e-25


def test_export_of_a_wrapper_with_an_escnn_linear_head():
    G = so2_group(2)
    space = gspaces.no_base_space(G)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _so2_model()
            self.head = enn.Linear(enn.FieldType(space, [G.irrep(1), G.irrep(0), G.irrep(1)]),
                                   enn.FieldType(space, [G.irrep(0), G.irrep(2), G.irrep(1)]))
            self.plain = torch.nn.Linear(3, 3)

    net = Net().double()
    _random_coefficients(net.head, seed=3)
    syms = symmetries_from_escnn(net)
    assert list(syms) == ["body.0", "body.1", "body.4", "head"]
    plain = from_escnn_export(net)
    assert isinstance(plain.head, torch.nn.Linear) and get_symmetry(plain.plain) is None
    assert get_symmetry(plain.head).group is syms["head"].group
    assert float(pk.model_penalty(plain).detach()) <= 1e-10 * float(plain.head.weight.detach().square().sum())
    with torch.no_grad():
        plain.head.weight.add_(1e-2 * torch.randn_like(plain.head.weight))
    assert float(pk.model_penalty(plain).detach()) > 1e-8


# --- biases ---------------------------------------------------------------------------------------

def _invariant_projector_finite(ft):
    """The average of rho_out(g) over every element of a finite group (the Reynolds operator)."""
    G = ft.fibergroup
    rho = ft.representation
    return torch.tensor(sum(rho(g) for g in G.elements) / G.order(), dtype=torch.float64)


def _invariant_projector_so2(ft, n=41):
    """The average of rho_out over n equally spaced rotations: exact for fields of frequencies below n."""
    G = ft.fibergroup
    rho = ft.representation
    return torch.tensor(sum(rho(G.element(2 * math.pi * k / n)) for k in range(n)) / n, dtype=torch.float64)


def _invariant_projector_generic(ft, n=3):
    """The orthogonal projector onto the vectors that n random elements all fix (they generate a
    dense subgroup, so those are the vectors the whole group fixes)."""
    rho = ft.representation
    np.random.seed(0)  # escnn samples elements with numpy's global generator
    stack = np.concatenate([rho(ft.fibergroup.sample()) - np.eye(ft.size) for _ in range(n)])
    _, s, vt = np.linalg.svd(stack)  # stack is (n d) x d: d singular values
    v = torch.tensor(vt[s < 1e-9].T, dtype=torch.float64)
    return v @ v.T


BIAS_CASES = ["so2", "o2_mixed", "d4_mixed", "so3"]


@functools.lru_cache(maxsize=None)
def bias_case(name):
    """(escnn layer, oracle of the projector onto its output type's invariant vectors)."""
    so2 = gspaces.rot2dOnR2(-1)
    t_so2 = enn.FieldType(so2, [so2.irrep(1), so2.irrep(0), so2.irrep(3), so2.irrep(0)])
    if name == "so2":
        return enn.R2Conv(enn.FieldType(so2, [so2.trivial_repr]), t_so2, 3), _invariant_projector_so2
    if name == "d4_mixed":
        d4 = gspaces.flipRot2dOnR2(4)
        t_d4 = enn.FieldType(d4, [d4.regular_repr, d4.irrep(1, 1), d4.trivial_repr, d4.irrep(1, 0)])
        return enn.R2Conv(enn.FieldType(d4, [d4.trivial_repr]), t_d4, 3), _invariant_projector_finite
    return _layer({"o2_mixed": "o2_mixed", "so3": "so3_irreps"}[name]), _invariant_projector_generic


@pytest.mark.parametrize("name", BIAS_CASES)
def test_bias_penalty_is_the_residual_of_the_independent_projection(name):
    layer, oracle = bias_case(name)
    layer = layer.double()
    _random_coefficients(layer, seed=1)
    sym = steerable_from_layer(layer)
    # kind="steerable": D4's fields here are signed permutations, which "auto" reads as the group average
    # (its biases project onto the same fixed space: tests/test_signed_fields.py)
    plain = from_escnn_export(enn.SequentialModule(layer), kind="steerable")[0]
    assert float(pk.model_penalty(torch.nn.Sequential(plain)).detach()) <= 1e-10 * float(
        plain.weight.detach().square().sum())  # escnn's own bias is equivariant
    P = oracle(layer.out_type)
    torch.testing.assert_close(P @ plain.bias.detach(), plain.bias.detach(), rtol=0, atol=1e-10)
    # a random bias: the penalty is ||b - P b||^2 of the oracle's P (the weight carries ~0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        plain.bias.copy_(torch.randn(plain.bias.shape, generator=g, dtype=torch.float64))
    b = plain.bias.detach().clone()
    want = float((b - P @ b).square().sum())
    assert want > 0.1
    model = torch.nn.Sequential(plain)
    pen = pk.model_penalty(model)
    assert float(pen.detach()) == pytest.approx(want, rel=1e-9)
    pen.backward()
    torch.testing.assert_close(plain.bias.grad, 2 * (b - P @ b), rtol=0, atol=1e-10)
    (row,) = pk.equivariance_report(model)
    assert row["bias_relative"] == pytest.approx(want ** 0.5 / float(b.norm()), rel=1e-9)
    assert get_symmetry(plain).group is sym
    pk.project_(model)
    torch.testing.assert_close(plain.bias.detach(), P @ b, rtol=0, atol=1e-10)
    assert float(pk.model_penalty(model).detach()) <= 1e-25


def test_a_bias_with_no_trivial_irrep_is_penalised_whole():
    so2 = gspaces.rot2dOnR2(-1)
    fi = enn.FieldType(so2, [so2.trivial_repr])
    fo = enn.FieldType(so2, [so2.irrep(1), so2.irrep(2)])
    sym = pk.steerable(fi, fo, 3)
    conv = torch.nn.Conv2d(1, 4, 3).double()
    with torch.no_grad():
        conv.weight.copy_(pk.project(conv.weight, sym))
    pk.attach_symmetry(conv, sym)
    model = torch.nn.Sequential(conv)
    b = conv.bias.detach().clone()
    assert float(pk.model_penalty(model).detach()) == pytest.approx(float(b.square().sum()), rel=1e-12)
    pk.project_(model)
    assert torch.equal(conv.bias.detach(), torch.zeros_like(b))


def test_steerable_bias_dtypes_compile_and_errors():
    from projkernels.symmetry.bias import bias_deviation_sq, project_bias
    layer, oracle = bias_case("so2")
    sym = steerable_from_layer(layer)
    P = oracle(layer.out_type)
    b = torch.randn(sym.out_type.size, dtype=torch.float64)
    want = float((b - P @ b).square().sum())
    half = b.to(torch.bfloat16)
    got = bias_deviation_sq(half, sym)
    assert got.dtype == torch.float32  # half biases accumulate in float32
    hb = half.double()
    assert float(got) == pytest.approx(float((hb - P @ hb).square().sum()), rel=1e-5)
    assert project_bias(half, sym).dtype == torch.bfloat16
    # model_penalty under torch.compile takes the bias term too, in one graph
    conv = torch.nn.Conv2d(1, sym.out_type.size, 3).double()
    pk.attach_symmetry(conv, sym)
    with torch.no_grad():
        conv.weight.copy_(pk.project(conv.weight, sym))
        conv.bias.copy_(b)
    model = torch.nn.Sequential(conv)
    compiled = torch.compile(lambda: pk.model_penalty(model), fullgraph=True, backend="eager")()
    assert float(compiled.detach()) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match=r"bias: shape \(3,\) does not match"):
        bias_deviation_sq(torch.zeros(3), sym)
