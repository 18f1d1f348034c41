"""The benchmark's models: one plain ``nn.Conv2d`` backbone and the approximate-equivariance routes.

Backbone (:class:`SmokeCNN`): ``history`` velocity frames in, the next frame out, as the last frame
plus a learned update; convs velocity -> hidden -> ... -> velocity with ReLU between them, zero
padding (rot90 maps it onto itself).  The field types come from ``symmetry`` (the one declaration).
Routes on top of it:

- ``none``, ``penalty``, ``decay``, ``projected``, ``sample``: the backbone itself, trained free,
  with ``lambda ||W - P(W)||^2`` in the loss, with the equivariance decay in the optimizer step, as an
  exact C4 CNN (projected gradients and weights), or with ``mu ||f(gx) - g f(x)||^2`` for one random
  quarter turn per step;
- ``so2``: the backbone with ``lambda ||W - P(W)||^2`` in the loss where P projects onto the span of
  escnn's SO(2)-steerable basis (``projkernels.steerable``; velocity as frequency-1 fields, hidden
  channels as scalars, see ``symmetry.so2_layer_symmetries``): a prior towards continuous rotations,
  band-limited kernels and, on the hidden layers, isotropic ones; needs escnn and the ``"vector"``
  declaration;
- ``rpp``: residual pathway prior (Finzi, Benton and Wilson, NeurIPS 2021): every conv is the sum of
  an exactly equivariant conv (kept projected) and a free conv of the same shape, with L2 priors
  ``eq_l2 ||A||^2 + weight ||B||^2`` (a weak prior on the equivariant path, a strong one on the free path);
- ``relaxed``: relaxed group convolution (Wang, Walters and Yu, ICML 2022): each conv's weight is
  ``sum_l w_l(g) E_l`` over ``banks`` equivariant filter banks ``E_l = P(Psi_l)``, with combination
  weights that depend on the group element ``g`` of the layer's regular side (the output side when it
  is regular, else the input side), and the relaxation regulariser
  ``weight * sum_l sum_g (w_l(g) - w_l(rg))^2``; equal ``w_l(g)`` over ``g`` is an exact C4 conv.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..api import project
from ..model import attach_symmetry, attached_layers, project_, project_bias_
from . import symmetry as sym

__all__ = ["SmokeCNN", "RelaxedConv2d", "build_model", "project_grads_", "sample_equivariance_loss",
           "relaxation_loss", "rpp_loss", "METHODS"]

METHODS = ("none", "penalty", "decay", "projected", "rpp", "relaxed", "sample", "so2")


class RelaxedConv2d(nn.Module):
    """A relaxed group convolution of ``banks`` filter banks (see the module docstring)."""

    def __init__(self, cin: int, cout: int, kernel: int, in_rep: str, out_rep: str, banks: int, bias: bool):
        super().__init__()
        self.in_rep, self.out_rep, self.padding = in_rep, out_rep, kernel // 2
        self.psi = nn.Parameter(torch.randn(banks, cout, cin, kernel, kernel) / math.sqrt(cin * kernel ** 2))
        self.side = 0 if out_rep == "regular" else 1       # which weight dim carries the group element
        n = (cout if self.side == 0 else cin) // sym.ORDER
        # w_l(g): one weight per bank and group element, shared by the fields; equal over g at the start.
        self.mix = nn.Parameter(torch.full((banks, sym.ORDER), 1.0 / banks))
        self.fields = n
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def banks(self) -> torch.Tensor:
        return torch.stack([project(p, sym.GROUP, self.in_rep, self.out_rep) for p in self.psi])

    def weight(self) -> torch.Tensor:
        e = self.banks()                                   # (L, cout, cin, k, k), each exactly equivariant
        w = self.mix.repeat(1, self.fields)                # channel = field * |G| + g
        shape = [w.shape[0]] + [1] * 4
        shape[1 + self.side] = w.shape[1]
        return (e * w.reshape(shape)).sum(0)

    def forward(self, x):
        return F.conv2d(x, self.weight(), self.bias, padding=self.padding)


class _Pair(nn.Module):
    """RPP: an equivariant conv (symmetry attached, kept projected) plus a free conv."""

    def __init__(self, cin, cout, kernel, bias):
        super().__init__()
        self.eq = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
        self.free = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)

    def forward(self, x):
        return self.eq(x) + self.free(x)


class SmokeCNN(nn.Module):
    """``history`` velocity frames -> next velocity frame; ``kind`` 'plain', 'rpp' or 'relaxed'."""

    def __init__(self, history: int, fields: int = 4, depth: int = 4, mode: str = "lifted", kind: str = "plain",
                 banks: int = 2):
        super().__init__()
        if kind not in ("plain", "rpp", "relaxed"):
            raise ValueError(f"kind: expected 'plain', 'rpp' or 'relaxed', got {kind!r}")
        if depth < 2:
            raise ValueError(f"depth: expected at least 2 convs, got {depth}")
        self.mode, self.kind, self.history = mode, kind, history
        vc = sym.velocity_channels(mode)
        self.widths = [vc * history] + [sym.ORDER * fields] * (depth - 1) + [vc]
        self.kernels = [5] + [3] * (depth - 1)
        self.reps = sym.layer_reps(depth, mode)
        layers = []
        for i, (cin, cout) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            k, bias = self.kernels[i], i < depth - 1   # the last layer maps to velocity: no bias
            if kind == "plain":
                layers.append(nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias))
            elif kind == "rpp":
                layers.append(_Pair(cin, cout, k, bias))
            else:
                layers.append(RelaxedConv2d(cin, cout, k, *self.reps[i], banks=banks, bias=bias))
        self.convs = nn.ModuleList(layers)

    def forward(self, x):
        h = sym.lift(x) if self.mode == "lifted" else x
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i + 1 < len(self.convs):
                h = torch.relu(h)
        if self.mode == "lifted":
            h = sym.read_out(h)
        return x[:, -2:] + h

    def attach(self, group: str = "C4") -> "SmokeCNN":
        """Attach the declared symmetry to each equivariant conv (the plain convs, RPP's equivariant path):
        ``group`` "C4" (the field types of ``symmetry``) or "SO(2)" (``symmetry.so2_layer_symmetries``)."""
        if group == "SO(2)":
            if self.kind != "plain" or self.mode != "vector":
                raise ValueError("group: SO(2) is declared for the plain backbone with velocity as 'vector' "
                                 f"fields, not kind={self.kind!r} with mode={self.mode!r}")
            for i, (conv, s) in enumerate(zip(self.convs, sym.so2_layer_symmetries(self.widths, self.kernels))):
                attach_symmetry(conv, s, name=f"convs.{i}")
            return self
        if group != sym.GROUP:
            raise ValueError(f"group: expected {sym.GROUP!r} or 'SO(2)', got {group!r}")
        for i, (conv, (i_rep, o_rep)) in enumerate(zip(self.convs, self.reps)):
            target = conv.eq if self.kind == "rpp" else conv
            if isinstance(target, nn.Conv2d):
                attach_symmetry(target, sym.GROUP, i_rep, o_rep, name=f"convs.{i}")
        return self


def _init_std(conv, model, fan_in: int) -> float:
    """He's std sqrt(2 / fan_in) inside; the last conv (the update to the last frame) 0.1 / sqrt(fan_in).
    A full-scale last layer starts with an update several times the true one, and the first steps then
    silence most ReLUs to cancel it: the model ends up predicting the last frame unchanged."""
    return 0.1 / math.sqrt(fan_in) if conv is model.convs[-1] else math.sqrt(2.0 / fan_in)


def build_model(history: int, fields: int, depth: int, mode: str, method: str, device, banks: int = 2) -> SmokeCNN:
    """The model of ``method`` with an exactly equivariant start, rescaled after projection (projecting a
    random weight shrinks it; see ``_init_std`` for the scales); RPP's free path starts at 1% of its default
    init and the relaxed banks' mixing weights equal over g, so every route starts (nearly) equivariant.
    The ``so2`` route starts in the span of its SO(2) basis."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    kind = {"rpp": "rpp", "relaxed": "relaxed"}.get(method, "plain")
    model = SmokeCNN(history, fields, depth, mode, kind, banks).to(device)
    model.attach("SO(2)" if method == "so2" else sym.GROUP)
    with torch.no_grad():
        if kind == "relaxed":
            for conv in model.convs:
                fan_in = conv.psi[0, 0].numel()
                conv.psi.mul_(_init_std(conv, model, fan_in) / conv.weight().std().clamp_min(1e-12))
            return model
        project_(model)
        for conv in model.convs:
            target = conv.eq if kind == "rpp" else conv
            fan_in = target.weight[0].numel()
            target.weight.mul_(_init_std(conv, model, fan_in) / target.weight.std().clamp_min(1e-12))
            if target.bias is not None:
                target.bias.zero_()
            if kind == "rpp":
                conv.free.weight.mul_(0.01)
                if conv.free.bias is not None:
                    conv.free.bias.zero_()
    return model


@torch.no_grad()
def project_grads_(model: nn.Module) -> None:
    """Each attached layer's gradient -> P(grad): Adam on the tied parameters of an exact C4 CNN (see the
    demo's ``project_grads_`` for why projecting only the weights is not enough)."""
    for _, module, s in attached_layers(model):
        if module.weight.grad is not None:
            module.weight.grad.copy_(project(module.weight.grad, s.group, s.in_rep, s.out_rep, backend=s.backend))
        if module.bias is not None and module.bias.grad is not None:
            project_bias_(module.bias.grad, s)


def sample_equivariance_loss(model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """mean (f(g x) - g f(x))^2 for one random non-identity quarter turn g (an extra forward and backward)."""
    j = int(torch.randint(1, sym.ORDER, (1,), generator=generator))
    if y is None:
        y = model(x)
    return (model(sym.rotate_velocity(x, j)) - sym.rotate_velocity(y, j)).square().mean()


def relaxation_loss(model: SmokeCNN) -> torch.Tensor:
    """sum over layers and banks of sum_g (w_l(g) - w_l(rg))^2: zero exactly when every conv is equivariant."""
    return sum((c.mix - c.mix.roll(1, 1)).square().sum() for c in model.convs)


def rpp_loss(model: SmokeCNN, free_l2: float, eq_l2: float) -> torch.Tensor:
    """RPP's priors: ``eq_l2 ||A||^2 + free_l2 ||B||^2`` summed over the layers' two paths."""
    terms: List[torch.Tensor] = []
    for c in model.convs:
        terms.append(eq_l2 * c.eq.weight.square().sum() + free_l2 * c.free.weight.square().sum())
    return sum(terms)
