"""The regular G-CNN of plain ``nn.Conv2d`` layers that the demo trains and the benchmarks time.

Layout: a lifting conv (trivial input channels -> regular fields), group convs (regular ->
regular), and optionally a head (regular -> ``out_channels`` trivial channels); ReLU between
layers, none after the last.  Channel = field * |G| + group element, the regular layout of
docs/design.md (Conventions).  The layers are ordinary convolutions: the network is only as
equivariant as its weights, which is what the projection penalty controls.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..api import project
from ..groups import get_group
from ..model import attach_regular_gcnn, attached_layers, project_, project_bias_

__all__ = ["GCNN", "build_model", "project_grads_", "sample_equivariance_loss"]


class GCNN(nn.Module):
    """A regular G-CNN for a rotation group ``C1``, ``C2`` or ``C4`` (rotations by multiples of 90
    degrees, exact on the square grid).

    ``fields[0]`` regular fields come out of the lifting conv (``lift_kernel`` x ``lift_kernel``),
    then one group conv per further entry of ``fields``; with ``out_channels`` set, a head maps the
    last regular fields to that many scalar (trivial) channels, otherwise the output is the last
    layer's regular fields.
    """

    def __init__(self, fields: Sequence[int] = (4, 4, 4), *, in_channels: int = 1, out_channels: Optional[int] = 1,
                 group: str = "C4", lift_kernel: int = 3, kernel: int = 3, bias: bool = True):
        super().__init__()
        g = get_group(group)
        if g.has_reflections or 4 % g.rotation_order:
            raise ValueError(f"group: GCNN rotates by multiples of 90 degrees; expected C1, C2 or C4, got {group!r}")
        if not fields:
            raise ValueError("fields: expected at least one entry (the lifting conv's output fields)")
        self.group, self.order = g.name, g.order
        widths = [self.order * f for f in fields]
        self.lift = nn.Conv2d(in_channels, widths[0], lift_kernel, padding=lift_kernel // 2, bias=bias)
        self.blocks = nn.ModuleList(nn.Conv2d(a, b, kernel, padding=kernel // 2, bias=bias)
                                    for a, b in zip(widths[:-1], widths[1:]))
        self.head = (None if out_channels is None else
                     nn.Conv2d(widths[-1], out_channels, kernel, padding=kernel // 2, bias=bias))

    def layers(self) -> List[nn.Conv2d]:
        return [self.lift, *self.blocks] + ([] if self.head is None else [self.head])

    def reps(self) -> List[Tuple[str, str]]:
        """(in_rep, out_rep) of each layer, in ``layers()`` order."""
        n = len(self.layers())
        last_out = "regular" if self.head is None else "trivial"
        return [("trivial" if i == 0 else "regular", last_out if i == n - 1 else "regular") for i in range(n)]

    def penalty_items(self) -> List[tuple]:
        """``(weight, group, in_rep, out_rep)`` per layer, the input of ``multi_penalty``."""
        return [(conv.weight, self.group, i, o) for conv, (i, o) in zip(self.layers(), self.reps())]

    def attach(self) -> "GCNN":
        """Attach each layer's symmetry (for ``model_penalty``, ``project_``, ``equivariance_report``)."""
        attach_regular_gcnn(self, self.group, first_in="trivial",
                            last_out="regular" if self.head is None else "trivial")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.layers()
        for i, conv in enumerate(layers):
            x = conv(x)
            if i + 1 < len(layers):
                x = torch.relu(x)
        return x

    def rotate_input(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """The rotation r^j on the input (trivial channels)."""
        return torch.rot90(x, j * 4 // self.order, dims=(-2, -1))

    def rotate_output(self, y: torch.Tensor, j: int) -> torch.Tensor:
        """r^j on the output: rotate the plane and, for regular fields, shift each field's components
        (rho(r^j) e_h = e_{r^j h}, i.e. a cyclic shift by j)."""
        y = torch.rot90(y, j * 4 // self.order, dims=(-2, -1))
        if self.head is not None:
            return y
        b, c, h, w = y.shape
        return torch.roll(y.reshape(b, c // self.order, self.order, h, w), shifts=j, dims=2).reshape(b, c, h, w)


def sample_equivariance_loss(model: GCNN, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The sample-based regulariser: mean of (f(g x) - g f(x))^2 for one uniformly drawn non-identity
    rotation g; pass ``y = model(x)`` to reuse a forward pass.  Costs an extra forward and backward."""
    j = int(torch.randint(1, model.order, (1,), generator=generator))
    if y is None:
        y = model(x)
    return (model(model.rotate_input(x, j)) - model.rotate_output(y, j)).square().mean()


def build_model(fields: int, depth: int, device, lift_kernel: int = 5) -> GCNN:
    """The demo's C4 G-CNN (``depth`` group convs of ``fields`` fields, scalar head) with its
    symmetries attached and an exactly equivariant He initialisation.

    Projecting a random weight averages |G| = 4 entries per orbit and halves its scale, so a
    projected default init shrinks the signal at every layer; each projected weight is rescaled to
    He's std sqrt(2 / fan_in) (the head to 1 / sqrt(fan_in)) and the biases are zeroed.  Every run
    starts from this same equivariant point; the penalty then controls how far training moves away.
    """
    model = GCNN((fields,) * (depth + 1), in_channels=1, out_channels=1, lift_kernel=lift_kernel).to(device)
    model.attach()
    project_(model)
    with torch.no_grad():
        for m in model.layers():
            fan_in = m.weight[0].numel()
            gain = 1.0 if m is model.head else 2.0
            m.weight.mul_(math.sqrt(gain / fan_in) / m.weight.std())
            m.bias.zero_()
    return model


@torch.no_grad()
def project_grads_(model: nn.Module) -> None:
    """Replace each attached layer's gradient by its projection P(grad) (regular biases: field means).

    Projecting the weights after a plain Adam step is not enough: the discarded non-equivariant
    part of the gradient still enters Adam's second-moment estimate, which shrinks every step (with
    breaking=0.3 and 256 examples this alone left the projected model at test error 0.10 instead of
    0.07).  With projected gradients Adam's moments are constant on orbits, so this is Adam on the
    tied parameters of a true G-CNN and the weights stay in the equivariant subspace.
    """
    for _, module, sym in attached_layers(model):
        if module.weight.grad is not None:
            module.weight.grad.copy_(project(module.weight.grad, sym.group, sym.in_rep, sym.out_rep,
                                             backend=sym.backend))
        if module.bias is not None and module.bias.grad is not None:
            project_bias_(module.bias.grad, sym)
