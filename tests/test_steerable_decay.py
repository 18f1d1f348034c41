"""The equivariance decay on layers with steerable symmetries: weights through their block
projection, biases through each output field's trivial-isotypic part.

The expected updates are written from projectors built independently of projkernels' routes: the
weight's P from the layer's dense orthonormal basis (``dense_basis``), the bias's P by averaging the
output representation over many rotations (SO(2) representations here are band-limited, so the
average over 41 evenly spaced angles is exactly the invariant projector)."""
import os

import pytest
import torch
from torch import nn

if os.environ.get("PROJKERNELS_REQUIRE_ESCNN") == "1":
    import escnn  # noqa: F401  (CI sets the variable: there these checks must run, not skip)
else:
    escnn = pytest.importorskip("escnn", reason="escnn is an optional test dependency (pip install '.[escnn]')")
from escnn import gspaces, nn as enn  # noqa: E402

import projkernels as pk  # noqa: E402


def _layer(dtype=torch.float64):
    gs = gspaces.rot2dOnR2(-1, maximum_frequency=3)
    in_type = enn.FieldType(gs, [gs.irrep(0), gs.irrep(1)])
    out_type = enn.FieldType(gs, [gs.irrep(0), gs.irrep(1), gs.irrep(2)])
    sym = pk.steerable(in_type, out_type, 3)
    torch.manual_seed(0)
    conv = nn.Conv2d(in_type.size, out_type.size, 3, padding=1, bias=True).to(dtype)
    pk.attach_symmetry(conv, sym)
    return conv, sym, out_type


def _weight_projection(w, sym):
    q = sym.dense_basis()
    flat = w.detach().double().reshape(-1)
    return (q @ (q.T @ flat)).reshape(w.shape)


def _bias_projection(b, out_type):
    n = 41
    avg = sum(torch.as_tensor(out_type.representation(out_type.gspace.fibergroup.element(2 * torch.pi * k / n)),
                              dtype=torch.float64) for k in range(n)) / n
    return avg @ b.detach().double()


@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
def test_decay_step_on_a_steerable_layer(mode):
    conv, sym, out_type = _layer()
    lr, lp, lg = 0.05, 0.8, 0.3
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    pw, pb = _weight_projection(w0, sym), _bias_projection(b0, out_type)
    assert (w0 - pw).norm() > 0.1 * w0.norm() and (b0 - pb).norm() > 0.1 * b0.norm()  # far from equivariant
    opt = torch.optim.SGD(conv.parameters(), lr=lr)
    handle = pk.equivariance_decay(opt, conv, lp, lg, mode=mode)
    conv.weight.grad = torch.zeros_like(conv.weight)
    conv.bias.grad = torch.zeros_like(conv.bias)
    opt.step()
    # Either mode with plain SGD: W <- W - lr (2 lp (W - P W) + 2 lg P W); the bias on lp only.
    torch.testing.assert_close(conv.weight.detach(), w0 - lr * (2 * lp * (w0 - pw) + 2 * lg * pw),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.bias.detach(), b0 - lr * 2 * lp * (b0 - pb), rtol=1e-12, atol=1e-12)
    assert handle.steps == 1


def test_coupled_decay_equals_the_penalty_in_the_loss():
    # The coupled mode adds exactly model_penalty's gradient, biases included.
    conv, sym, _ = _layer()
    ref = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1).double()
    ref.load_state_dict(conv.state_dict())
    pk.attach_symmetry(ref, sym)
    lp, lg = 0.4, 0.2
    pk.model_penalty(ref, lp, lg).backward()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    pk.equivariance_decay(opt, conv, lp, lg, mode="coupled")
    opt.zero_grad(set_to_none=True)
    seen = {}  # the gradients the step itself used, after the decay's pre-hook
    opt.register_step_post_hook(lambda o, a, k: seen.update(w=conv.weight.grad.clone(), b=conv.bias.grad.clone()))
    opt.step()
    torch.testing.assert_close(seen["w"], ref.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(seen["b"], ref.bias.grad, rtol=1e-10, atol=1e-12)


def test_decay_of_a_half_steerable_weight_is_computed_in_float32():
    # The update is formed in float32 from the bfloat16 weight and rounded once: equal, bit for bit,
    # to that computation written out (rounding P W or the step to bfloat16 first differs).
    conv, sym, _ = _layer(torch.bfloat16)
    conv.weight.data = (torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16)
    w0 = conv.weight.detach().clone()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    pk.equivariance_decay(opt, conv, 1.0, bias=False)
    conv.weight.grad = torch.zeros_like(conv.weight)
    conv.bias.grad = torch.zeros_like(conv.bias)
    opt.step()
    w32 = w0.float()
    pw32 = pk.project(w32, sym)
    assert torch.equal(conv.weight.detach(), (w32 - 0.2 * (w32 - pw32)).to(torch.bfloat16))
    twice = w0 + (-0.2 * (w32 - pw32)).to(torch.bfloat16)  # the step rounded, then the sum
    assert not torch.equal(conv.weight.detach(), twice)  # the check above can tell the two apart
    # And the exact update, rounded once, is never more than one unit in the last place away.
    exact = w0.double() - 0.2 * (w0.double() - _weight_projection(w0.double(), sym))
    assert ((conv.weight.detach().double() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-30).all()


def test_the_decay_backend_serves_steerable_layers_and_is_checked_up_front():
    conv, sym, _ = _layer()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot serve"):
        pk.equivariance_decay(opt, conv, 1.0, backend="cuda")  # CPU tensors: refused before any step
    w0 = conv.weight.detach().clone()
    pk.equivariance_decay(opt, conv, 1.0, backend="reference", bias=False)
    conv.weight.grad = torch.zeros_like(conv.weight)
    conv.bias.grad = torch.zeros_like(conv.bias)
    opt.step()
    pw = _weight_projection(w0, sym)
    torch.testing.assert_close(conv.weight.detach(), w0 - 0.2 * (w0 - pw), rtol=1e-12, atol=1e-12)
