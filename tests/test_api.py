"""The public API on the backends that serve CPU tensors: defaults, the meaning of P(W) (a projected
layer is equivariant), argument validation and torch.compile.

Values, gradients, dtypes and strided inputs of every backend are checked against the oracle in
tests/test_conformance.py.
"""
import pytest
import torch
import torch.nn.functional as F

import projkernels as pk
from projkernels.orbits import field_size
from projkernels.backends.reference import brute_force_project

from cases import shape_for

# Triton on CPU tensors means its interpreter: far too slow for this whole matrix, and
# tests/test_triton_backend.py covers it.
BACKENDS = [b for b in pk.available_backends("cpu") if b != "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_defaults_are_c4_trivial_to_trivial():
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(pk.projected_penalty(w), (w - brute_force_project(w, "C4")).square().sum())


# --- the meaning: P(W) is an equivariant layer, W is not --------------------------------------

def _act_on_features(x, G, g, rep):
    """rho(g) T_g on a feature tensor (batch, channels, *spatial), as on kernels."""
    size = field_size(rep, G)
    b, c = x.shape[:2]
    y = G.kernel_action(x, g) if x.dim() > 2 else x
    if rep == "regular":
        fields = y.reshape(b, c // size, size, *y.shape[2:])
        perm = torch.as_tensor(G.mul[G.inverse[g]])  # (rho(g) v)[gh] = v[h]  =>  new[c] = old[g^-1 c]
        y = fields[:, :, perm].reshape(y.shape)
    return y


LAYERS = [("C4", (3, 3), F.conv2d), ("D4", (4, 4), F.conv2d), ("D1", (3, 3), F.conv2d), ("C2", (2, 2), F.conv2d),
          ("C2", (3,), F.conv1d), ("D1", (4,), F.conv1d), ("C8", (), F.linear), ("D5", (), F.linear)]


@pytest.mark.parametrize("group,kernel,op", LAYERS, ids=[f"{g}-{len(k)}d" for g, k, _ in LAYERS])
@pytest.mark.parametrize("ir,orr", [("trivial", "regular"), ("regular", "regular"), ("regular", "trivial")])
def test_projected_layer_is_equivariant(group, kernel, op, ir, orr, backend):
    torch.manual_seed(0)
    G = pk.get_group(group)
    w = torch.randn(shape_for(group, ir, orr, kernel, 2, 3), dtype=torch.float64)
    pw = pk.project(w, group, ir, orr, backend=backend)
    x = torch.randn((2, w.shape[1]) + (9,) * len(kernel), dtype=torch.float64)
    worst_p = worst_w = 0.0
    for g in range(G.order):
        gx = _act_on_features(x, G, g, ir)
        for weight, store in ((pw, "p"), (w, "w")):
            lhs = op(gx, weight)
            rhs = _act_on_features(op(x, weight), G, g, orr)
            err = float((lhs - rhs).abs().max() / rhs.abs().max())
            if store == "p":
                worst_p = max(worst_p, err)
            else:
                worst_w = max(worst_w, err)
    assert worst_p < 1e-12
    assert worst_w > 1e-2


# --- input handling ----------------------------------------------------------------------------

BAD = [
    (lambda: pk.projected_penalty(torch.randn(6, 4, 3, 3), "C4", "trivial", "regular"), ValueError,
     r"weight: dim 0 .* multiple of the regular field size 4"),
    (lambda: pk.projected_penalty(torch.randn(4, 6, 3, 3), "C4", "regular", "trivial"), ValueError,
     r"weight: dim 1 .* multiple of the regular field size 4"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), "X4"), ValueError, r"group: unknown group 'X4'"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), 4), TypeError, r"group: expected"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), "C4", "irregular"), ValueError,
     r"in_rep: unknown representation 'irregular'"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), "C4", "trivial", None), TypeError, r"out_rep"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), "C8"), ValueError,
     r"group: C8 does not act exactly on a 3x3 kernel"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3), "C4"), ValueError,
     r"group: C4 does not act exactly on a 1-D kernel"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 5), "C4"), ValueError, r"must be square; got a 3x5"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 5), "D2"), ValueError, r"must be square"),
    (lambda: pk.projected_penalty(torch.randint(0, 3, (4, 4, 3, 3))), TypeError, r"weight: expected a floating"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3, dtype=torch.complex64)), TypeError, r"floating dtype"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3, 3, 3)), ValueError, r"weight: expected shape"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3, 3), "C4"), ValueError,
     r"group: C4 acts on 1-D and 2-D kernels; weight has shape \(4, 4, 3, 3, 3\)"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), "O"), ValueError, r"group: O acts on 3-D kernels"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3, 5), "Oh"), ValueError, r"weight: Oh .* must be a cube"),
    (lambda: pk.projected_penalty(torch.randn(4)), ValueError, r"weight: expected shape"),
    (lambda: pk.projected_penalty([[1.0]]), TypeError, r"weight: expected a torch.Tensor"),
    (lambda: pk.projected_penalty(torch.randn(4, 4, 3, 3), backend="fastest"), ValueError, r"backend: unknown"),
    (lambda: pk.spectrum(torch.randn(4, 4, 3, 3), "D0"), ValueError, r"N >= 1"),
    (lambda: pk.project(torch.randn(0, 4, 3, 3)), ValueError, r"dim 0"),
]


@pytest.mark.parametrize("call,exc,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_errors(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_unavailable_backend_says_why():
    missing = [b for b in ("cpp", "cuda", "triton") if b not in pk.available_backends("cpu")]
    if "cuda" not in missing:
        missing.append("cuda")  # a CPU tensor can never use the CUDA backend
    for name in missing:
        with pytest.raises(RuntimeError, match=rf"backend='{name}' cannot serve a weight on cpu: .+"):
            pk.projected_penalty(torch.randn(4, 4, 3, 3), backend=name)


def test_non_square_allowed_without_rotation():
    w = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(pk.project(w, "D1"), brute_force_project(w, "D1"))


def test_compiled_training_step(backend):
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(4, 8, 3, bias=False)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)

    @torch.compile(fullgraph=True)
    def loss_fn(x):
        out = conv(x)
        penalty = pk.projected_penalty(conv.weight, "C4", "regular", "regular", backend=backend)
        return out.square().mean() + penalty, penalty

    def step(x):
        loss, penalty = loss_fn(x)
        loss.backward()
        opt.step()
        return loss, penalty

    before = float(pk.projected_penalty(conv.weight.detach(), "C4", "regular", "regular"))
    for _ in range(3):
        opt.zero_grad()
        eager = pk.projected_penalty(conv.weight.detach(), "C4", "regular", "regular")
        loss, penalty = step(torch.randn(2, 4, 8, 8))
        torch.testing.assert_close(penalty.detach(), eager)
        assert conv.weight.grad is not None and torch.isfinite(loss)
    for _ in range(20):
        opt.zero_grad()
        pk.projected_penalty(conv.weight, "C4", "regular", "regular", backend=backend).backward()
        opt.step()
    assert float(pk.projected_penalty(conv.weight.detach(), "C4", "regular", "regular")) < 1e-3 * before
