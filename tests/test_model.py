import copy
import gc
import math
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from torch import nn

import projkernels as pk
from projkernels.model import (Symmetry, attach_regular_gcnn, attach_symmetries, attach_symmetry, attached_layers,
                               detach_symmetry, equivariance_report, format_report, get_symmetry, model_penalty,
                               project_)


class TinyGCNN(nn.Module):
    """C4 G-CNN from plain convs: lift trivial->regular, one group conv, head regular->trivial."""

    def __init__(self, fields=2, bias=True):
        super().__init__()
        self.lift = nn.Conv2d(1, 4 * fields, 3, padding=1, bias=bias)
        self.mid = nn.Conv2d(4 * fields, 4 * fields, 3, padding=1, bias=bias)
        self.head = nn.Conv2d(4 * fields, 2, 3, padding=1, bias=bias)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.lift(x)))))


def _model(bias=True, dtype=torch.float64):
    torch.manual_seed(0)
    m = TinyGCNN(bias=bias).to(dtype)
    attach_regular_gcnn(m, "C4", first_in="trivial", last_out="trivial")
    return m


def test_attach_records_symmetry_and_survives_deepcopy():
    m = _model()
    assert get_symmetry(m.lift) == Symmetry("C4", "trivial", "regular")
    assert get_symmetry(m.mid) == Symmetry("C4", "regular", "regular")
    assert get_symmetry(m.head) == Symmetry("C4", "regular", "trivial")
    assert [n for n, _, _ in attached_layers(copy.deepcopy(m))] == ["lift", "mid", "head"]
    assert "_projkernels_symmetry" not in str(m.state_dict().keys())
    detach_symmetry(m.mid)
    assert [n for n, _, _ in attached_layers(m)] == ["lift", "head"]


def test_attach_validates_at_attach_time():
    with pytest.raises(ValueError, match="multiple of the regular field size 4"):
        attach_symmetry(nn.Conv2d(1, 6, 3), "C4", "trivial", "regular")
    with pytest.raises(ValueError, match="does not act exactly"):
        attach_symmetry(nn.Conv2d(1, 8, 3), "C8", "trivial", "regular")
    with pytest.raises(ValueError, match="unknown representation"):
        attach_symmetry(nn.Linear(4, 4), "C4", "regular", "irrep")
    with pytest.raises(ValueError, match="grouped"):
        attach_symmetry(nn.Conv2d(8, 8, 3, groups=2), "C4", "regular", "regular")
    with pytest.raises(TypeError, match="nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d"):
        attach_symmetry(nn.ConvTranspose3d(1, 4, 3), "C4")
    with pytest.raises(ValueError, match="group: C4 acts on 1-D and 2-D kernels"):
        attach_symmetry(nn.Conv3d(1, 4, 3), "C4")
    # a rule's error names the layer
    seq = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 6))
    with pytest.raises(ValueError, match=r"^layer '1' \(Linear 6x8\): weight: "):
        attach_symmetries(seq, lambda name, m: ("C4", "regular", "regular"))


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3))  # 6: not a multiple of 4
        self.out = nn.Conv2d(6, 1, 3)


def test_attach_errors_name_the_layer_by_module_path():
    # attach_regular_gcnn: the bad layer is deep in the model; the error gives its path, type and shape
    with pytest.raises(ValueError) as info:
        attach_regular_gcnn(_Nested(), "C4", first_in="trivial", last_out="trivial")
    msg = str(info.value)
    assert msg.startswith("layer 'body.2' (Conv2d 6x8x3x3): weight: ") and "multiple of" in msg
    # attach_symmetries: the same, and a rule returning nonsense is blamed on its layer too
    with pytest.raises(ValueError, match=r"^layer 'body.2' \(Conv2d 6x8x3x3\): "):
        attach_symmetries(_Nested(), lambda name, m: ("C4", "regular", "regular") if name == "body.2" else None)
    with pytest.raises(TypeError, match=r"^layer 'out' \(Conv2d 1x6x3x3\): rule: "):
        attach_symmetries(_Nested(), lambda name, m: 4 if name == "out" else None)
    # attach_symmetry on its own: named when the caller passes a name, else by type and shape
    conv = nn.Conv2d(1, 6, 3)
    with pytest.raises(ValueError, match=r"^layer 'enc.conv1' \(Conv2d 6x1x3x3\): weight: "):
        attach_symmetry(conv, "C4", "trivial", "regular", name="enc.conv1")
    with pytest.raises(ValueError, match=r"^layer \(Conv2d 6x1x3x3\): weight: "):
        attach_symmetry(conv, "C4", "trivial", "regular")
    assert get_symmetry(conv) is None  # a failed attach leaves nothing behind
    with pytest.raises(TypeError, match=r"^layer 'x' \(ConvTranspose3d 1x4x3x3x3\): module: expected nn.Linear"):
        attach_symmetry(nn.ConvTranspose3d(1, 4, 3), "C4", name="x")


def test_attach_rejects_loose_group_names():
    with pytest.raises(ValueError, match=r"^layer \(Linear 4x4\): group: 'c4' is not a group name"):
        attach_symmetry(nn.Linear(4, 4), "c4", "regular", "regular")
    # the model-level group argument fails once, before any layer is touched
    model = _Nested()
    with pytest.raises(ValueError, match=r"^group: 'C04' is not a group name"):
        attach_regular_gcnn(model, "C04")
    assert attached_layers(model) == []
    assert attach_symmetry(nn.Linear(4, 4), "C4", "regular", "regular") == Symmetry("C4", "regular", "regular")


def test_attach_symmetries_rule_forms():
    seq = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Linear(4, 3), nn.Conv1d(4, 4, 1))
    got = attach_symmetries(seq, lambda name, m: {"0": ("C2", "regular", "regular"), "2": "D4"}.get(name))
    assert got == {"0": Symmetry("C2", "regular", "regular"), "2": Symmetry("D4")}
    assert get_symmetry(seq[3]) is None


def test_model_penalty_is_sum_of_layer_penalties_and_differentiable():
    m = _model(bias=False)
    lp, lg = 0.7, 0.2
    total = model_penalty(m, lambda_perp=lp, lambda_G=lg)
    expected = sum(lp * pk.projected_penalty(mod.weight, s.group, s.in_rep, s.out_rep)
                   + lg * pk.equivariant_energy(mod.weight, s.group, s.in_rep, s.out_rep)
                   for _, mod, s in attached_layers(m))
    assert torch.allclose(total, expected, rtol=1e-12)
    total.backward()
    for _, mod, s in attached_layers(m):
        p = pk.project(mod.weight.detach(), s.group, s.in_rep, s.out_rep)
        want = 2 * lp * (mod.weight.detach() - p) + 2 * lg * p
        assert torch.allclose(mod.weight.grad, want, atol=1e-12)


def test_model_penalty_bias_term():
    m = _model(bias=True)
    with_bias = model_penalty(m)
    without = model_penalty(m, bias=False)
    b = m.lift.bias.view(-1, 4)
    b2 = m.mid.bias.view(-1, 4)
    extra = (b - b.mean(1, keepdim=True)).square().sum() + (b2 - b2.mean(1, keepdim=True)).square().sum()
    assert torch.allclose(with_bias - without, extra, rtol=1e-10)  # the head's bias is trivial: always equivariant
    with_bias.backward()
    assert m.lift.bias.grad is not None and m.lift.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no layer has a symmetry"):
        model_penalty(nn.Sequential(nn.Linear(2, 2)))


def test_project_makes_model_exactly_equivariant():
    m = _model()
    x = torch.randn(3, 1, 10, 10, dtype=torch.float64)

    @torch.no_grad()
    def eq_err(model):
        fx = model(x)
        return max(float((model(torch.rot90(x, k, (-2, -1))) - torch.rot90(fx, k, (-2, -1))).abs().max())
                   for k in range(1, 4))

    assert eq_err(m) > 1e-3  # random weights are not equivariant
    project_(m)
    assert float(model_penalty(m).detach()) < 1e-25
    assert eq_err(m) < 1e-12
    # projecting twice changes nothing (P is a projector)
    before = [p.clone() for p in m.parameters()]
    project_(m)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_report_and_table():
    m = _model()
    rows = equivariance_report(m)
    assert [r["name"] for r in rows] == ["lift", "mid", "head"]
    for r, (_, mod, s) in zip(rows, attached_layers(m)):
        w = mod.weight.detach()
        assert r["shape"] == list(w.shape) and r["group"] == "C4"
        assert list(r["spectrum"]) == list(pk.irrep_names("C4"))
        assert abs(sum(r["spectrum"].values()) - float(w.square().sum())) < 1e-9
        rel = float((w - pk.project(w, s.group, s.in_rep, s.out_rep)).norm() / w.norm())
        assert abs(r["relative"] - rel) < 1e-9 and 0.1 < rel < 1
    text = format_report(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows) and "rel. non-eq" in lines[0] and "C4 trivial->regular" in text
    project_(m)
    assert all(r["relative"] < 1e-12 for r in equivariance_report(m))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_penalty_biases_in_the_weights_op(dtype):
    # With a native whole-model op the regular-field biases ride in it as [C, 1] weights; the value,
    # every gradient, and lambda_G acting on weights only must match a layer-by-layer computation
    # with the reference backend and the biases' field means written out.
    from projkernels.model import _model_plan
    m = _model(bias=True, dtype=dtype)
    if "cpp" not in pk.available_backends("cpu"):
        pytest.skip("the compiled extension is not built")
    assert _model_plan(m)[0].with_biases is not None  # the fused route is the one under test
    lp, lg = 0.7, 0.3
    total = model_penalty(m, lp, lg)
    params = [m.lift.weight, m.mid.weight, m.head.weight, m.lift.bias, m.mid.bias]
    grads = torch.autograd.grad(total, params)

    expected = torch.zeros((), dtype=torch.float64)
    for layer, grad in zip((m.lift, m.mid, m.head), grads[:3]):
        sym = get_symmetry(layer)
        w = layer.weight.detach().double()
        pw = pk.project(w, sym.group, sym.in_rep, sym.out_rep, backend="reference")
        expected += lp * (w - pw).square().sum() + lg * pw.square().sum()
        torch.testing.assert_close(grad.double(), 2 * lp * (w - pw) + 2 * lg * pw,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    for b, grad in zip((m.lift.bias, m.mid.bias), grads[3:]):
        f = b.detach().double().view(-1, 4)
        dev = f - f.mean(1, keepdim=True)
        expected += lp * dev.square().sum()  # lambda_G never reaches a bias
        torch.testing.assert_close(grad.double(), (2 * lp * dev).reshape(-1),
                                   rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    assert total.dtype == dtype
    # bias=False leaves the biases out of the graph entirely.
    no_bias = model_penalty(m, lp, lg, bias=False)
    assert torch.autograd.grad(no_bias, [m.lift.bias], allow_unused=True)[0] is None


def test_project_bias_is_the_field_mean_and_ignores_trivial_outputs():
    from projkernels.model import project_bias_
    v = torch.arange(8.0)
    project_bias_(v, Symmetry("C4", "trivial", "regular"))
    assert torch.equal(v, torch.tensor([1.5] * 4 + [5.5] * 4))
    t = torch.arange(8.0)
    project_bias_(t, Symmetry("C4", "regular", "trivial"))  # trivial output fields: already equivariant
    assert torch.equal(t, torch.arange(8.0))
    d = torch.arange(16.0)
    project_bias_(d, Symmetry("D4", "regular", "regular"))  # field size |D4| = 8
    assert torch.equal(d, torch.tensor([3.5] * 8 + [11.5] * 8))
    project_bias_(None, Symmetry("C4", "regular", "regular"))  # a layer without bias


# --- the cached plan: weak references only, rebuilt by the model's own changes only ----------------

def _steerable_linear():
    """A Linear layer with a steerable SO(2) symmetry (fields of irreps 0 and 1: a trivial bias part)."""
    pytest.importorskip("escnn", reason="escnn is an optional test dependency")
    from escnn import gspaces, nn as enn
    from escnn.group import so2_group
    G = so2_group(2)
    gs = gspaces.no_base_space(G)
    ft = enn.FieldType(gs, [G.irrep(0), G.irrep(1)])
    layer = nn.Linear(3, 3).double()
    attach_symmetry(layer, pk.steerable(ft, ft))
    return layer


def _build(kind):
    torch.manual_seed(0)
    if kind == "linear":
        m = nn.Linear(8, 8).double()
        attach_symmetry(m, "C4", "regular", "regular")
    elif kind == "conv2d":
        m = nn.Conv2d(4, 8, 3).double()
        attach_symmetry(m, "C4", "regular", "regular")
    elif kind == "steerable":
        m = _steerable_linear()
    else:
        m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).double()
        attach_regular_gcnn(m, "C4", last_out="regular")
    return m


@pytest.mark.parametrize("kind", ["linear", "conv2d", "steerable", "sequential"])
def test_a_model_is_freed_after_model_penalty(kind):
    # The plan cache is keyed by the model; a bare layer is its own model, so a plan that held its
    # layers strongly would keep the layer (and its weights) alive for good.
    m = _build(kind)
    model_penalty(m, 1.0, 0.5).backward()
    model_penalty(m)  # served from the cache
    refs = [weakref.ref(m)] + [weakref.ref(x) for _, layer, _ in attached_layers(m) for x in (layer, layer.weight)]
    del m
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


def test_a_bare_layer_is_freed_after_every_model_level_call():
    layer = _build("conv2d")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    decay = pk.equivariance_decay(opt, layer, 0.1, 0.01)
    model_penalty(layer).backward()
    opt.step()
    format_report(equivariance_report(layer))
    project_(layer)
    model_penalty(layer)
    refs = [weakref.ref(layer), weakref.ref(layer.weight), weakref.ref(layer.bias)]
    decay.remove()
    del layer, opt, decay
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


def _brute_penalty(m):
    """The penalty of ``m`` layer by layer with the reference backend, regular-field biases by their
    deviation from the field means."""
    total = torch.zeros((), dtype=torch.float64)
    for _, layer, s in attached_layers(m):
        w = layer.weight.detach().double()
        total += pk.projected_penalty(w, s.group, s.in_rep, s.out_rep, backend="reference")
        if layer.bias is not None and s.out_rep == "regular":
            f = layer.bias.detach().double().view(-1, 4)
            total += (f - f.mean(1, keepdim=True)).square().sum()
    return total


def test_unrelated_modules_leave_a_cached_plan_alone():
    import projkernels.model as model_mod
    m = _build("sequential")
    first = model_penalty(m)
    plan = model_mod._MODEL_PLANS[m]
    # Modules created, and parameters and submodules registered, outside the model.
    nn.Linear(3, 3)
    nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    other = nn.Module()
    other.register_parameter("p", nn.Parameter(torch.ones(2)))
    other.add_module("sub", nn.Linear(2, 2))
    other.q = nn.Parameter(torch.zeros(3))
    # ... and another model with a cached plan of its own, changed.
    m2 = _build("sequential")
    model_penalty(m2)
    plan2 = model_mod._MODEL_PLANS[m2]
    m2[2].weight = nn.Parameter(torch.randn(8, 8, 3, 3, dtype=torch.float64))
    again = model_penalty(m)
    assert model_mod._MODEL_PLANS[m] is plan
    assert torch.equal(first, again)
    torch.testing.assert_close(model_penalty(m2).detach(), _brute_penalty(m2))
    assert model_mod._MODEL_PLANS[m2] is not plan2


def test_changes_to_the_model_rebuild_its_plan():
    import projkernels.model as model_mod
    m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)).double()
    attach_regular_gcnn(m, "C4", last_out="regular")
    model_penalty(m)
    state = {"plan": model_mod._MODEL_PLANS[m]}

    def check(rebuilt=True):
        got = model_penalty(m)
        plan = model_mod._MODEL_PLANS[m]
        assert (plan is not state["plan"]) == rebuilt
        state["plan"] = plan
        torch.testing.assert_close(got.detach(), _brute_penalty(m), rtol=1e-12, atol=0)

    check(rebuilt=False)
    detach_symmetry(m[3])
    check()
    attach_symmetry(m[3], "C4", "regular", "regular")
    check()
    m[2].weight = nn.Parameter(torch.randn(8, 8, 3, 3, dtype=torch.float64))  # same shape, replaced
    check()
    m[2].bias = None
    check()
    m[2].bias = nn.Parameter(torch.randn(8, dtype=torch.float64))
    check()
    m.append(nn.Conv2d(8, 8, 1).double())  # a layer added ...
    check()
    attach_symmetry(m[4], "C4", "regular", "regular")  # ... and attached
    check()
    del m[2]  # a layer removed (no registration hook runs)
    assert len(attached_layers(m)) == 3
    check()
    m[0].weight.requires_grad_(False)  # a frozen layer: penalised, without a gradient
    check(rebuilt=False)
    model_penalty(m).backward()
    assert m[0].weight.grad is None and m[2].weight.grad is not None


# --- the report: NaN and inf are reported, never as "equivariant" -----------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_report_shows_non_finite_weights_and_biases(bad, where):
    m = _model()
    with torch.no_grad():
        getattr(m.mid, where).view(-1)[3] = bad
    rows = equivariance_report(m)
    lift, mid, head = rows
    for r in (lift, head):
        assert all(math.isfinite(x) for x in (r["weight_norm"], r["penalty"], r["relative"]))
    if where == "weight":
        assert math.isnan(mid["relative"]) and math.isnan(mid["penalty"])
        assert (math.isnan if math.isnan(bad) else math.isinf)(mid["weight_norm"])
        assert not any(math.isfinite(v) for v in mid["spectrum"].values())
        assert math.isfinite(mid["bias_relative"])
    else:
        assert math.isnan(mid["bias_relative"]) and math.isfinite(mid["relative"])
    text = format_report(rows).splitlines()
    mid_line = next(line for line in text if line.startswith("mid "))
    assert "nan!" in mid_line and "0.00e+00" not in mid_line
    assert not any("!" in line for line in text if line.startswith(("lift ", "head ")))
    assert text[-1].startswith("! non-finite (NaN or inf)") and text[-1].endswith(": mid")
    assert "!" not in format_report(equivariance_report(_model()))  # a finite model: no marker


@pytest.mark.parametrize("where", ["weight", "bias"])
def test_report_shows_non_finite_steerable_layers(where):
    layer = _steerable_linear()
    with torch.no_grad():
        getattr(layer, where).view(-1)[0] = math.nan
    (row,) = equivariance_report(layer)
    if where == "weight":
        assert math.isnan(row["relative"]) and math.isnan(row["weight_norm"])
    else:
        assert math.isnan(row["bias_relative"]) and math.isfinite(row["relative"])
    assert "nan!" in format_report([row]).splitlines()[2]


def test_sharded_report_shows_non_finite_values_and_the_sharded_model_is_freed():
    # One rank (gloo) with DTensor parameters: equivariance_report takes its sharded route, and
    # model_penalty its sharded one, whose plan must not keep the layer alive either.
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    code = textwrap.dedent("""
        import gc, math, socket, weakref
        import torch, torch.distributed as dist
        from torch import nn
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        import projkernels as pk
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        layer = nn.Linear(8, 8).double()
        pk.attach_symmetry(layer, "C4", "regular", "regular")
        with torch.no_grad():
            layer.weight[0, 0] = math.nan
            layer.bias[1] = math.inf
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
        layer.bias = nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Shard(0)]))
        (row,) = pk.equivariance_report(layer)
        assert math.isnan(row["relative"]) and math.isnan(row["bias_relative"]), row
        text = pk.format_report([row])
        assert "nan!" in text.splitlines()[2] and "0.00e+00" not in text, text
        pk.model_penalty(layer)
        pk.model_penalty(layer)
        ref = weakref.ref(layer)
        del layer
        gc.collect()
        assert ref() is None, "the sharded layer is kept alive"
        dist.destroy_process_group()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
