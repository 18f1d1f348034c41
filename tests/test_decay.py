"""Equivariance decay (projkernels.equivariance_decay and the multi_decay ops)."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import projkernels as pk
from projkernels import decay as D
from projkernels.model import attach_symmetry
from projkernels.orbits import orbit_table
from projkernels.backends.reference import brute_force_project

CPU_BACKENDS = D.decay_backends("cpu")
NATIVE = [b for b in CPU_BACKENDS if b != "reference"]


# --- helpers -------------------------------------------------------------------------------------

class Net(nn.Module):
    """A C4 G-CNN of plain layers (lifting conv, group conv, 1x1 head to one regular field) and an
    unattached linear readout."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.lift = nn.Conv2d(1, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.readout = nn.Linear(4 * 5 * 5, 3)
        self.to(dtype)
        pk.attach_regular_gcnn(self, "C4", first_in="trivial", last_out="regular")
        with torch.no_grad():  # non-equivariant biases too, so the bias term is exercised
            for m in (self.lift, self.mid, self.head):
                m.bias.normal_()

    def forward(self, x):
        h = torch.relu(self.lift(x))
        h = torch.relu(self.mid(h))
        return self.readout(self.head(h).flatten(1))

    def attached(self):
        return [self.lift, self.mid, self.head]


def _data(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 1, 5, 5, generator=g).to(dtype), torch.randn(6, 3, generator=g).to(dtype)


def _two_groups(model, lr_lift, lr_rest, opt_cls=torch.optim.SGD, **kw):
    lift = list(model.lift.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in lift)]
    return opt_cls([{"params": lift, "lr": lr_lift}, {"params": rest, "lr": lr_rest}], **kw)


def _parts(module, sym_group="C4"):
    """(W - P W, P W) of the weight and (b - mean, mean) of a regular-field bias, in float64."""
    from projkernels.model import get_symmetry
    s = get_symmetry(module)
    w = module.weight.detach().double()
    pw = brute_force_project(w, s.group, s.in_rep, s.out_rep)
    out = {"w_dev": w - pw, "w_eq": pw}
    if module.bias is not None and s.out_rep == "regular":
        b = module.bias.detach().double().view(-1, pk.get_group(s.group).order)
        m = b.mean(dim=1, keepdim=True).expand_as(b)
        out.update(b_dev=b - m, b_eq=m)
    return out


def _train(route, *, steps=5, lam=0.3, lam_g=0.0, dtype=torch.float64, backend="auto", scaler=None,
           fused=False):
    """SGD over a few steps with a changing lr, the penalty in the loss or the decay."""
    torch.manual_seed(0)
    model = Net(dtype)
    x, y = _data(dtype)
    opt = _two_groups(model, 0.05, 0.02, fused=fused) if fused else _two_groups(model, 0.05, 0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.5 * k))
    handle = None
    if route in D.MODES:
        handle = pk.equivariance_decay(opt, model, lam, lam_g, mode=route, backend=backend)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).square().mean()
        if route == "penalty":
            loss = loss + pk.model_penalty(model, lam, lam_g)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()
    return model, handle


def _assert_same_params(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        err = (p.detach().double() - q.detach().double()).abs().max().item()
        assert err <= tol * (1 + q.detach().double().abs().max().item()), f"{name}: {err}"


# --- SGD: both modes are the penalty in the loss -------------------------------------------------

@pytest.mark.parametrize("lam_g", [0.0, 0.2])
@pytest.mark.parametrize("mode", D.MODES)
# Triton (interpreted on CPU) is held against the reference on tiny tensors further down.
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_sgd_decay_equals_penalty_in_the_loss(mode, backend, lam_g):
    ref, _ = _train("penalty", lam_g=lam_g)
    got, handle = _train(mode, lam_g=lam_g, backend=backend)
    assert handle.steps == 5
    _assert_same_params(got, ref, 1e-12)
    # The decay changed the weights: a decay that did nothing would fail against the penalty route.
    plain, _ = _train("penalty", lam=0.0)
    diff = (got.mid.weight - plain.mid.weight).abs().max().item()
    assert diff > 1e-3


def test_sgd_float32_within_rounding():
    ref, _ = _train("penalty", dtype=torch.float32, lam_g=0.1)
    for mode in D.MODES:
        got, _ = _train(mode, dtype=torch.float32, lam_g=0.1)
        _assert_same_params(got, ref, 2e-6)


# --- AdamW: the decoupled decay shrinks the non-equivariant part by 1 - 2 lr lambda ---------------

@pytest.mark.parametrize("lam_g", [0.0, 0.5])
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_adamw_zero_loss_shrinks_the_non_equivariant_part_exactly(backend, lam_g):
    torch.manual_seed(0)
    model = Net()
    lam, lrs = 0.7, {"lift": 0.1, "mid": 0.03, "head": 0.03}
    opt = _two_groups(model, lrs["lift"], lrs["mid"], torch.optim.AdamW, weight_decay=0.0)
    pk.equivariance_decay(opt, model, lam, lam_g, backend=backend)
    readout = model.readout.weight.detach().clone()
    for _ in range(3):
        before = {n: _parts(getattr(model, n)) for n in lrs}
        opt.zero_grad(set_to_none=False)
        (0.0 * model(_data()[0]).sum()).backward()  # a zero task loss: zero gradients, a no-op Adam step
        opt.step()
        for n, lr in lrs.items():
            after = _parts(getattr(model, n))
            f_dev, f_eq = 1 - 2 * lr * lam, 1 - 2 * lr * lam_g
            torch.testing.assert_close(after["w_dev"], f_dev * before[n]["w_dev"], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(after["w_eq"], f_eq * before[n]["w_eq"], rtol=1e-12, atol=1e-14)
            # Biases: deviation from the field mean shrinks as the weight's; lambda_G leaves them alone.
            torch.testing.assert_close(after["b_dev"], f_dev * before[n]["b_dev"], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(after["b_eq"], before[n]["b_eq"], rtol=1e-12, atol=1e-14)
            assert before[n]["w_dev"].norm() > 0.1
    torch.testing.assert_close(model.readout.weight.detach(), readout, rtol=0, atol=0)  # not attached


def test_adamw_weight_decay_composes():
    torch.manual_seed(0)
    model = Net()
    lr, wd, lam = 0.05, 0.1, 0.4
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    pk.equivariance_decay(opt, model, lam)
    before = _parts(model.mid)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = _parts(model.mid)
    torch.testing.assert_close(after["w_dev"], (1 - lr * wd) * (1 - 2 * lr * lam) * before["w_dev"], rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(after["w_eq"], (1 - lr * wd) * before["w_eq"], rtol=1e-12, atol=1e-14)


# --- dtypes, backends, exactness --------------------------------------------------------------

def _mixed_model():
    m = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(16, 8))
    m[0].to(torch.float32)
    m[1].to(torch.float64)
    m[2].to(torch.bfloat16)
    attach_symmetry(m[0], "C4", "trivial", "regular")
    attach_symmetry(m[1], "D4", "regular", "regular")
    attach_symmetry(m[2], "C8", "regular", "regular")
    with torch.no_grad():
        for layer in m:
            layer.bias.normal_()
    return m


@pytest.mark.parametrize("mode", D.MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_one_step(backend, mode):
    torch.manual_seed(0)
    m = _mixed_model()
    lr, lam, lam_g = 0.1, 0.6, 0.3
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    pk.equivariance_decay(opt, m, lam, lam_g, mode=mode, backend=backend)
    start = [_parts(layer) for layer in m]
    orig = [layer.weight.detach().clone() for layer in m]
    opt.zero_grad(set_to_none=True)
    opt.step()
    tol = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2}
    for layer, s, w0 in zip(m, start, orig):
        w = layer.weight
        assert w.dtype == w0.dtype
        expect = s["w_dev"] * (1 - 2 * lr * lam) + s["w_eq"] * (1 - 2 * lr * lam_g)
        t = tol[w.dtype]
        torch.testing.assert_close(w.detach().double(), expect, rtol=t, atol=t)
        b = layer.bias.detach().double().view(s["b_dev"].shape)
        torch.testing.assert_close(b, s["b_dev"] * (1 - 2 * lr * lam) + s["b_eq"], rtol=t, atol=t)
        assert (w.detach() != w0).any()
        if mode == "coupled":  # the gradient was created and holds exactly the penalty's gradient
            g = layer.weight.grad.double()
            torch.testing.assert_close(g, 2 * lam * s["w_dev"] + 2 * lam_g * s["w_eq"], rtol=t, atol=t)


# An orbit with a non-trivial stabiliser lists its entries several times (the centre of a 3x3 kernel
# under C4 with trivial fields: four times).  An update that adds once per listing would fail here.
EXACT_SPECS = [
    ((3, 2, 3, 3), "C4", "trivial", "trivial"),
    ((8, 8, 3, 3), "D4", "regular", "regular"),
    ((16, 2, 3, 3), "D4", "trivial", "regular"),
    ((4, 8, 5), "D2", "regular", "trivial"),
    ((16, 1), "C8", "trivial", "regular"),
    # Orders above the kernels' array bound (64) take the streamed path: a free action, and a
    # trivial one where every orbit is one entry listed |G| times.
    ((66, 2), "C66", "trivial", "regular"),
    ((5, 3), "C70", "trivial", "trivial"),
]


def _check_apply_decay_against_dense_brute_force(backend, in_place, device):
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(s[0], generator=g, dtype=torch.float64) for s in EXACT_SPECS]
    ts = [torch.randn(s[0], generator=g, dtype=torch.float64) for s in EXACT_SPECS]
    tables = [orbit_table(*s) for s in EXACT_SPECS]
    cd = [-0.35, 0.5, 1.25, -0.1, 0.75, 0.6, -0.45]
    cm = [0.2, -0.4, 0.0, 0.3, -1.0, 0.15, 0.5]
    targets = [x.clone().to(device) for x in (ws if in_place else ts)]
    D.apply_decay_(targets, None if in_place else [w.to(device) for w in ws], tables, cd, cm, backend=backend)
    for i, (s, w) in enumerate(zip(EXACT_SPECS, ws)):
        pw = brute_force_project(w, *s[1:])
        old = w if in_place else ts[i]
        expect = old + cd[i] * (w - pw) + cm[i] * pw
        torch.testing.assert_close(targets[i].cpu(), expect, rtol=1e-13, atol=1e-13, msg=f"{s}")


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_apply_decay_against_dense_brute_force(backend, in_place):
    _check_apply_decay_against_dense_brute_force(backend, in_place, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("in_place", [True, False])
def test_gpu_apply_decay_against_dense_brute_force(in_place):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for backend in D.decay_backends("cuda"):
        _check_apply_decay_against_dense_brute_force(backend, in_place, "cuda")


@pytest.mark.parametrize("mode", D.MODES)
@pytest.mark.parametrize("backend", NATIVE)
def test_backends_agree_with_the_reference(backend, mode):
    results = {}
    for b in ("reference", backend):
        torch.manual_seed(0)
        m = _mixed_model()
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        pk.equivariance_decay(opt, m, 0.9, 0.1, mode=mode, backend=b)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype)
        opt.step()
        results[b] = [p.detach().clone() for p in m.parameters()]
    for p, q in zip(results[backend], results["reference"]):
        if p.dtype == torch.bfloat16:
            # Both round a float32 value once; the float32 values may differ in the last bits.
            torch.testing.assert_close(p.double(), q.double(), rtol=8e-3, atol=8e-3)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6 if p.dtype == torch.float32 else 1e-13, atol=1e-7)


@pytest.mark.parametrize("backend", NATIVE)
def test_deterministic(backend):
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        ws = [torch.randn(s[0], generator=g, dtype=torch.float32) for s in EXACT_SPECS]
        n = len(EXACT_SPECS)
        D.apply_decay_(ws, None, [orbit_table(*s) for s in EXACT_SPECS], [-0.3] * n, [-0.1] * n, backend=backend)
        outs.append(ws)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_non_contiguous_weight_is_updated_in_place():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3).double().to(memory_format=torch.channels_last)
    attach_symmetry(conv, "C4", "regular", "regular")
    assert not conv.weight.is_contiguous()
    before = _parts(conv)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    pk.equivariance_decay(opt, conv, 1.0)
    opt.step()
    after = _parts(conv)
    torch.testing.assert_close(after["w_dev"], 0.8 * before["w_dev"], rtol=1e-12, atol=1e-14)
    assert not conv.weight.is_contiguous()  # still the same parameter, in its own layout


# --- the handle ----------------------------------------------------------------------------------

def test_remove_detaches():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = pk.equivariance_decay(opt, model, 1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert h.steps == 1
    h.remove()
    h.remove()  # idempotent
    assert not h.attached and "removed" in repr(h)
    w = model.mid.weight.detach().clone()
    opt.step()
    assert torch.equal(model.mid.weight.detach(), w)
    assert h.steps == 1


def test_frozen_parameters_are_left_alone():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pk.equivariance_decay(opt, model, 1.0, mode="coupled")
    model.mid.weight.requires_grad_(False)
    w = model.mid.weight.detach().clone()
    opt.step()
    assert torch.equal(model.mid.weight, w) and model.mid.weight.grad is None
    assert not torch.equal(model.lift.weight.grad, torch.zeros_like(model.lift.weight))


def test_errors_name_the_argument():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model: no layer has a symmetry attached"):
        pk.equivariance_decay(opt, nn.Linear(3, 3), 1.0)
    with pytest.raises(ValueError, match="mode: expected one of"):
        pk.equivariance_decay(opt, model, 1.0, mode="adamw")
    with pytest.raises(ValueError, match="lambda_perp"):
        pk.equivariance_decay(opt, model, -1.0)
    with pytest.raises(ValueError, match="lambda_G"):
        pk.equivariance_decay(opt, model, 1.0, -0.1)
    with pytest.raises(ValueError, match="lambda_perp"):
        pk.equivariance_decay(opt, model, float("nan"))
    with pytest.raises(TypeError, match="lambda_G"):
        pk.equivariance_decay(opt, model, 1.0, "0.1")
    with pytest.raises(TypeError, match="optimizer"):
        pk.equivariance_decay(model.parameters(), model, 1.0)
    with pytest.raises(TypeError, match="model"):
        pk.equivariance_decay(opt, [model.mid], 1.0)
    with pytest.raises(ValueError, match="backend"):
        pk.equivariance_decay(opt, model, 1.0, backend="fast")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run the decay on cpu"):
        pk.equivariance_decay(opt, model, 1.0, backend="cuda")
    # A weight (or bias) that the optimizer does not hold.
    partial = torch.optim.SGD([p for n, p in model.named_parameters() if n != "mid.weight"], lr=0.1)
    with pytest.raises(ValueError, match=r"mid\.weight is not in the optimizer"):
        pk.equivariance_decay(partial, model, 1.0)
    no_bias = torch.optim.SGD([p for n, p in model.named_parameters() if n != "head.bias"], lr=0.1)
    with pytest.raises(ValueError, match=r"head\.bias is not in the optimizer.*bias=False"):
        pk.equivariance_decay(no_bias, model, 1.0)
    pk.equivariance_decay(no_bias, model, 1.0, bias=False)


def test_coupled_refuses_a_closure():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pk.equivariance_decay(opt, model, 1.0, mode="coupled")
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure)


def test_state_dict_and_pickling():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    h = pk.equivariance_decay(opt, model, 1.0)
    x, y = _data()
    (model(x) - y).square().mean().backward()
    opt.step()
    # The model pickles and copies as before (the handle put nothing on it).
    clone = pickle.loads(pickle.dumps(model))
    assert all(torch.equal(p, q) for p, q in zip(clone.parameters(), model.parameters()))
    copy.deepcopy(model)
    assert set(model.state_dict()) == set(Net().state_dict())
    # The optimizer's state_dict round trip: saving it sees no hook, loading keeps the decay attached
    # and the loaded lr is the one the decay uses.
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    sd["param_groups"][0]["lr"] = 0.05
    opt.load_state_dict(sd)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.state.clear()  # fresh Adam moments: a zero gradient is then a no-op step
    before = _parts(model.mid)
    opt.step()
    torch.testing.assert_close(_parts(model.mid)["w_dev"], 0.9 * before["w_dev"], rtol=1e-12, atol=1e-14)
    assert h.steps == 2
    # A new optimizer loads the state too, and a pickled optimizer carries no hook.
    opt2 = torch.optim.Adam(model.parameters(), lr=0.1)
    opt2.load_state_dict(sd)
    assert not pickle.loads(pickle.dumps(opt))._optimizer_step_pre_hooks


def test_param_groups_reordered_by_load_state_dict_still_found():
    model = Net()
    opt = _two_groups(model, 0.1, 0.01)
    pk.equivariance_decay(opt, model, 1.0)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, dtype=torch.float64))], "lr": 0.5})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = _parts(model.lift)
    opt.step()  # the groups changed: the decay finds each parameter's group again
    torch.testing.assert_close(_parts(model.lift)["w_dev"], 0.8 * before["w_dev"], rtol=1e-12, atol=1e-14)


# --- GradScaler ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", D.MODES)
def test_grad_scaler(mode, fused):
    # GradScaler.step unscales before optimizer.step (so before the hook), or, for a fused optimizer,
    # hands it grad_scale: either way the coupled addition must end up unscaled.
    kw = dict(dtype=torch.float32, lam_g=0.1)
    ref, _ = _train("penalty", **kw, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0), fused=fused)
    got, _ = _train(mode, **kw, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0), fused=fused)
    _assert_same_params(got, ref, 2e-6)


def test_grad_scaler_skipped_step_skips_the_decay():
    model = Net(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = pk.equivariance_decay(opt, model, 1.0)
    scaler = torch.amp.GradScaler("cpu")
    w = model.mid.weight.detach().clone()
    loss = model(_data(torch.float32)[0]).sum() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    assert torch.equal(model.mid.weight, w) and h.steps == 0


# --- the raw ops ---------------------------------------------------------------------------------

def test_apply_decay_checks_lengths():
    w = torch.randn(8, 8, 3, 3)
    t = orbit_table(w, "C4", "regular", "regular")
    with pytest.raises(ValueError, match="coef_mean: expected one entry per target"):
        D.apply_decay_([w], None, [t], [0.1], [0.0, 0.0])
    with pytest.raises(ValueError, match="tables"):
        D.apply_decay_([w, w.clone()], None, [t], [0.1, 0.1], [0.0, 0.0])


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="projkernels._C is not built")
def test_raw_op_rejects_bad_input():
    ops = torch.ops.projkernels_C
    t = orbit_table((8, 8, 3, 3), "C4", "regular", "regular")
    off = t.device_tables("cpu").offsets
    geo = [t.c_out, t.c_in, t.stride_out, t.stride_in, int(t.signed)]
    w = torch.randn(8, 8, 3, 3)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.multi_decay_([w.transpose(0, 1)], [off], geo, [0.1], [0.0])
    with pytest.raises(RuntimeError, match="geometry"):
        ops.multi_decay_([w], [off], geo[:3], [0.1], [0.0])
    with pytest.raises(RuntimeError, match="reach outside"):
        ops.multi_decay_([w], [off + 1000], geo, [0.1], [0.0])
    with pytest.raises(RuntimeError, match="coef_dev"):
        ops.multi_decay_([w], [off], geo, [0.1, 0.2], [0.0])
    with pytest.raises(RuntimeError, match="float16, bfloat16"):
        ops.multi_decay_([w.int()], [off], geo, [0.1], [0.0])
    with pytest.raises(RuntimeError, match="dtype and size"):
        ops.multi_decay_grad_([w.double()], [w], [off], geo, [0.1], [0.0])


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="projkernels._C is not built")
def test_raw_ops_pass_opcheck():
    ops = torch.ops.projkernels_C
    t = orbit_table((8, 8, 3, 3), "C4", "regular", "regular")
    off = t.device_tables("cpu").offsets
    geo = [t.c_out, t.c_in, t.stride_out, t.stride_in, int(t.signed)]
    w, g = torch.randn(8, 8, 3, 3), torch.randn(8, 8, 3, 3)
    torch.library.opcheck(ops.multi_decay_, ([w], [off], geo, [-0.1], [0.0]))
    torch.library.opcheck(ops.multi_decay_grad_, ([g], [w], [off], geo, [0.1], [0.2]))


def test_overshooting_rate_warns_once():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    h = pk.equivariance_decay(opt, model, 2.0)
    with pytest.warns(RuntimeWarning, match="overshoots"):
        opt.step()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert h.steps == 2 and h.optimizer is opt


def test_example_runs():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "train_with_decay.py")
    spec = importlib.util.spec_from_file_location("train_with_decay", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    after = mod.main(["--steps", "8"])
    assert len(after) == 4 and all(0 <= a < 1 for a in after)


# --- GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode", D.MODES)
def test_gpu_backends_agree_with_the_reference(mode):
    backends = [b for b in D.decay_backends("cuda") if b != "reference"]
    assert backends, "no GPU decay backend"
    results = {}
    for b in ["reference"] + backends:
        torch.manual_seed(0)
        m = _mixed_model().cuda()
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        pk.equivariance_decay(opt, m, 0.9, 0.1, mode=mode, backend=b)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p)
        opt.step()
        results[b] = [p.detach().cpu().clone() for p in m.parameters()]
    for b in backends:
        for p, q in zip(results[b], results["reference"]):
            tol = {torch.bfloat16: 8e-3, torch.float32: 1e-6}.get(p.dtype, 1e-13)
            torch.testing.assert_close(p.double(), q.double(), rtol=tol, atol=tol, msg=b)


@pytest.mark.gpu
def test_gpu_sgd_equals_penalty_in_the_loss():
    def run(route):
        torch.manual_seed(0)
        model = Net().cuda()
        x, y = (t.cuda() for t in _data())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        if route != "penalty":
            pk.equivariance_decay(opt, model, 0.3, 0.1, mode=route)
        for _ in range(3):
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            if route == "penalty":
                loss = loss + pk.model_penalty(model, 0.3, 0.1)
            loss.backward()
            opt.step()
        return model
    ref = run("penalty")
    for mode in D.MODES:
        _assert_same_params(run(mode), ref, 1e-12)
