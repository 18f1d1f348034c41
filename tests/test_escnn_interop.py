import os

import numpy as np
import pytest
import torch

if os.environ.get("PROJKERNELS_REQUIRE_ESCNN") == "1":
    import escnn  # noqa: F401  (CI sets the variable: there these checks must run, not skip)
else:
    escnn = pytest.importorskip("escnn", reason="escnn is an optional test dependency (pip install '.[escnn]')")
from escnn import gspaces, nn as enn  # noqa: E402

from projkernels.escnn_interop import (from_escnn_export, symmetries_from_escnn, symmetry_from_r2conv,  # noqa: E402
                                       symmetry_from_r3conv)
from projkernels.model import Symmetry, attached_layers, get_symmetry, model_penalty  # noqa: E402

GSPACES = {"C4": lambda: gspaces.rot2dOnR2(4), "D4": lambda: gspaces.flipRot2dOnR2(4),
           "D1": lambda: gspaces.flip2dOnR2()}


def _net(gs, out_trivial=2):
    t_in = enn.FieldType(gs, [gs.trivial_repr])
    t_mid = enn.FieldType(gs, 2 * [gs.regular_repr])
    t_out = enn.FieldType(gs, out_trivial * [gs.trivial_repr])
    return enn.SequentialModule(
        enn.R2Conv(t_in, t_mid, 5, padding=2), enn.ReLU(t_mid),
        enn.R2Conv(t_mid, t_mid, 4, padding=1), enn.ReLU(t_mid),
        enn.R2Conv(t_mid, t_out, 3, padding=1))


@pytest.mark.parametrize("group", ["C4", "D4", "D1"])
def test_export_has_zero_penalty(group):
    torch.manual_seed(0)
    net = _net(GSPACES[group]()).to(torch.float64)
    syms = symmetries_from_escnn(net)
    assert syms == {"0": Symmetry(group, "trivial", "regular"), "2": Symmetry(group, "regular", "regular"),
                    "4": Symmetry(group, "regular", "trivial")}
    plain = from_escnn_export(net)
    assert isinstance(plain, torch.nn.Sequential)
    assert [n for n, _, _ in attached_layers(plain)] == ["0", "2", "4"]
    sq_norm = sum(float(m.weight.detach().square().sum()) for _, m, _ in attached_layers(plain))
    assert plain[0].weight.dtype == torch.float64
    assert float(model_penalty(plain).detach()) / sq_norm <= 1e-10
    # a perturbed copy is clearly penalised: the check above is not vacuous
    with torch.no_grad():
        plain[2].weight.add_(1e-2 * torch.randn_like(plain[2].weight))
    assert float(model_penalty(plain).detach()) / sq_norm > 1e-7


def test_plain_module_holding_escnn_parts_and_order_mapping():
    gs = gspaces.rot2dOnR2(4)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _net(gs)
            self.extra = torch.nn.Linear(3, 3)

    # float64 like the test above: escnn shares sampled bases between modules, so converting one
    # net's dtype and then running a net of another dtype fails inside escnn
    w = Wrapper().to(torch.float64)
    plain = from_escnn_export(w)
    assert isinstance(plain.body, torch.nn.Sequential) and isinstance(w.body, enn.SequentialModule)
    assert get_symmetry(plain.body[2]) == Symmetry("C4", "regular", "regular")
    assert get_symmetry(plain.extra) is None
    assert float(model_penalty(plain).detach()) < 1e-8


def test_rejections_name_the_problem():
    # kind="group_average" insists on a finite (group, in_rep, out_rep); "auto" would read these
    # layers' own bases instead (tests/test_steerable_interop.py)
    gs = gspaces.rot2dOnR2(4)
    # Fields whose matrices are signed permutations map to their names (a mixed side to a direct sum).
    mixed = enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr])
    conv = enn.R2Conv(enn.FieldType(gs, [gs.trivial_repr]), mixed, 3)
    assert symmetry_from_r2conv(conv, kind="group_average").out_rep == "(regular + trivial)"
    irrep = enn.FieldType(gs, [gs.irrep(1)])
    assert symmetry_from_r2conv(enn.R2Conv(irrep, irrep, 3), kind="group_average").in_rep == "irrep_1"
    # C8's frequency-1 irrep rotates by 45 degrees: not a signed permutation.
    gs8 = gspaces.rot2dOnR2(8)
    t8 = enn.FieldType(gs8, [gs8.regular_repr, gs8.irrep(1)])
    with pytest.raises(ValueError, match="field 1 has representation 'irrep_1', whose matrices are not signed"):
        symmetry_from_r2conv(enn.R2Conv(enn.FieldType(gs8, [gs8.trivial_repr]), t8, 1), kind="group_average")
    conv = enn.R2Conv(enn.FieldType(gs8, [gs8.trivial_repr]), t8, 3)
    t = enn.FieldType(gs8, [gs8.regular_repr])
    with pytest.raises(ValueError, match="does not act exactly"):
        symmetry_from_r2conv(enn.R2Conv(t, t, 3), kind="group_average")
    gsa = gspaces.flip2dOnR2(axis=0.0)
    ta = enn.FieldType(gsa, [gsa.regular_repr])
    with pytest.raises(ValueError, match="axis"):
        symmetry_from_r2conv(enn.R2Conv(ta, ta, 3), kind="group_average")
    so2 = gspaces.rot2dOnR2(-1)
    with pytest.raises(ValueError, match="continuous rotations"):
        symmetry_from_r2conv(enn.R2Conv(enn.FieldType(so2, [so2.trivial_repr]),
                                        enn.FieldType(so2, [so2.irrep(1)]), 3), kind="group_average")
    with pytest.raises(TypeError, match="R2Conv"):
        symmetry_from_r2conv(torch.nn.Conv2d(1, 1, 3))
    with pytest.raises(ValueError, match="kind: expected one of"):
        symmetry_from_r2conv(conv, kind="average")


# --- R3Conv on octaOnR3() / fullOctaOnR3() -------------------------------------------------------------

def _net3d(gs):
    t_in = enn.FieldType(gs, [gs.trivial_repr])
    t_mid = enn.FieldType(gs, [gs.regular_repr])
    t_out = enn.FieldType(gs, 2 * [gs.trivial_repr])
    return enn.SequentialModule(
        enn.R3Conv(t_in, t_mid, 3, padding=1), enn.ReLU(t_mid),
        enn.R3Conv(t_mid, t_out, 3, padding=1))


@pytest.mark.parametrize("group,make", [("O", gspaces.octaOnR3), ("Oh", gspaces.fullOctaOnR3)])
def test_r3conv_export_has_zero_penalty(group, make):
    torch.manual_seed(0)
    net = _net3d(make()).to(torch.float64)
    syms = symmetries_from_escnn(net)
    assert syms == {"0": Symmetry(group, "trivial", "regular"), "2": Symmetry(group, "regular", "trivial")}
    assert symmetry_from_r3conv(dict(net.named_modules())["0"]) == syms["0"]
    plain = from_escnn_export(net)
    assert [type(m).__name__ for _, m, _ in attached_layers(plain)] == ["Conv3d", "Conv3d"]
    sq_norm = sum(float(m.weight.detach().square().sum()) for _, m, _ in attached_layers(plain))
    assert float(model_penalty(plain).detach()) / sq_norm <= 1e-10
    # the exported network is invariant to the cube's rotations of the input volume
    x = torch.randn(1, 1, 5, 5, 5, dtype=torch.float64)
    y = plain(x)
    torch.testing.assert_close(plain(torch.rot90(x, 1, dims=(-3, -1))), torch.rot90(y, 1, dims=(-3, -1)))
    with torch.no_grad():
        plain[0].weight.add_(1e-2 * torch.randn_like(plain[0].weight))
    assert float(model_penalty(plain).detach()) / sq_norm > 1e-7


def test_r3conv_rejections_name_the_problem():
    from projkernels.escnn_interop import _cube_group_name

    gs = gspaces.octaOnR3()
    # O's 2-D irrep is not a signed permutation (regular and trivial fields, or the 3-D vector rep, are).
    mixed = enn.FieldType(gs, [gs.regular_repr, {ir.name: ir for ir in gs.fibergroup.irreps()}["irrep_2"]])
    with pytest.raises(ValueError, match="enc: .*field 1"):
        symmetry_from_r3conv(enn.R3Conv(enn.FieldType(gs, [gs.trivial_repr]), mixed, 3), name="enc",
                             kind="group_average")
    with pytest.raises(TypeError, match="R3Conv"):
        symmetry_from_r3conv(torch.nn.Conv3d(1, 1, 3))
    with pytest.raises(TypeError, match="R2Conv"):
        symmetry_from_r2conv(enn.R3Conv(enn.FieldType(gs, [gs.trivial_repr]), enn.FieldType(gs, [gs.trivial_repr]), 3))
    # other 3-D gspaces, and the cube's group in a rotated frame (elements moving R^3 differently)
    with pytest.raises(ValueError, match="expected octaOnR3"):
        _cube_group_name(gspaces.icoOnR3())
    with pytest.raises(ValueError, match="expected octaOnR3"):
        _cube_group_name(gspaces.rot2dOnR2(4))
    from escnn import group as egroup
    turn = egroup.so3_group().element(np.array([0.0, 0.0, np.sin(np.pi / 8), np.cos(np.pi / 8)]), "Q")
    rotated = gspaces.GSpace3D((False, "octa", egroup.o3_group().element((0, turn.to("Q")), "Q")))
    with pytest.raises(ValueError, match="differently from escnn's default octaOnR3"):
        _cube_group_name(rotated)


def test_export_leaves_the_escnn_model_alone():
    """The export copies: the escnn model keeps its mode (escnn's export() would switch it to eval) and
    its weights, and training the export does not write into escnn's cached filter."""
    gs = gspaces.octaOnR3()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _net3d(gs)
            self.head = torch.nn.Linear(2, 1)

    model = Wrapper().to(torch.float64)
    model.train()
    model.body.eval()
    dict(model.body.named_modules())["0"].train()  # a mix of modes, each must survive
    modes = [m.training for m in model.modules()]
    before = [p.detach().clone() for p in model.parameters()]
    plain = from_escnn_export(model)
    assert [m.training for m in model.modules()] == modes
    assert isinstance(plain.body, torch.nn.Sequential) and isinstance(model.body, enn.SequentialModule)
    assert plain.head is not model.head and plain.head.weight is not model.head.weight
    assert get_symmetry(plain.body[0]) == Symmetry("O", "trivial", "regular") and get_symmetry(plain.head) is None
    cached = dict(model.body.named_modules())["2"].filter.detach().clone()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert torch.equal(dict(model.body.named_modules())["2"].filter, cached)
