"""The benchmark's symmetry declaration, in one place: the group, the field type of a velocity field
and of the hidden layers, and how C4 acts on velocity tensors.

Velocity is stored as ``(..., 2, H, W)`` with component 0 along dim -2 and component 1 along dim -1.
The quarter turn ``r`` moves the plane by ``torch.rot90(., 1, dims=(-2, -1))`` (the kernel action of
docs/design.md, Conventions) and turns each vector by ``(u, v) -> (-v, u)``: escnn's irrep(1) of C4,
the field type named ``VELOCITY`` below.

Two declarations of the same network are supported, chosen once by :func:`declaration`:

- ``"vector"``: velocity in and out are C4 vector fields (2 channels per frame), hidden layers regular.
  Needs a projkernels whose field types include signed permutations (``"vector"``).
- ``"lifted"``: where ``"vector"`` is not available, each velocity frame is lifted to one regular field
  ``(u, v, -u, -v)`` (component j = the velocity along the j-th quarter-turned axis), the network maps
  regular fields to one regular output field, and the velocity is read back as
  ``((c0 - c2) / 2, (c1 - c3) / 2)``.  The regular representation of C4 contains the vector irrep, so
  lift and read-out are exactly equivariant: the same model class, declared with ``"trivial"`` /
  ``"regular"`` types only.  The lift doubles the first layer's input channels.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import torch

__all__ = ["GROUP", "VELOCITY", "HIDDEN", "ORDER", "declaration", "layer_reps", "rotate_velocity",
           "lift", "read_out", "so2_available", "so2_layer_symmetries"]

GROUP = "C4"
VELOCITY = "vector"   # escnn's irrep(1) of C4: (u, v) -> (-v, u)
HIDDEN = "regular"
ORDER = 4


@lru_cache(maxsize=None)
def vector_rep_available() -> bool:
    """Whether this projkernels handles ``VELOCITY`` fields of ``GROUP`` everywhere the benchmark needs
    them: attaching, ``model_penalty`` (the fused multi-layer route), ``project_`` and the decay."""
    from torch import nn

    from ..decay import equivariance_decay
    from ..model import attach_symmetry, model_penalty, project_
    try:
        net = nn.Sequential(nn.Conv2d(2, ORDER, 3, bias=False), nn.Conv2d(ORDER, 2, 3, bias=False))
        attach_symmetry(net[0], GROUP, VELOCITY, HIDDEN)
        attach_symmetry(net[1], GROUP, HIDDEN, VELOCITY)
        model_penalty(net).backward()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        handle = equivariance_decay(opt, net, 1.0)
        opt.step()
        handle.remove()
        project_(net)
        return bool(model_penalty(net) < 1e-6)
    except (ValueError, TypeError, KeyError, IndexError, NotImplementedError, RuntimeError):
        return False


def declaration(mode: str = "auto") -> str:
    """``"vector"`` or ``"lifted"`` (see the module docstring); ``"auto"`` takes ``"vector"`` when available."""
    if mode not in ("auto", "vector", "lifted"):
        raise ValueError(f"mode: expected 'auto', 'vector' or 'lifted', got {mode!r}")
    if mode == "auto":
        return "vector" if vector_rep_available() else "lifted"
    if mode == "vector" and not vector_rep_available():
        raise ValueError(f"mode: this projkernels has no {VELOCITY!r} field type of {GROUP}; use 'lifted'")
    return mode


def velocity_rep(mode: str) -> str:
    return VELOCITY if mode == "vector" else HIDDEN


def velocity_channels(mode: str) -> int:
    """Channels of one velocity frame as the network sees it."""
    return 2 if mode == "vector" else ORDER


def layer_reps(n_layers: int, mode: str) -> List[Tuple[str, str]]:
    """(in_rep, out_rep) of each conv of an ``n_layers`` backbone: velocity -> hidden ... -> velocity."""
    v = velocity_rep(mode)
    return [(v if i == 0 else HIDDEN, v if i == n_layers - 1 else HIDDEN) for i in range(n_layers)]


def so2_available() -> bool:
    """Whether escnn is importable (the SO(2)-span route's bases come from it)."""
    try:
        import escnn  # noqa: F401
    except ImportError:
        return False
    return True


def so2_layer_symmetries(widths: List[int], kernels: List[int]) -> list:
    """The SO(2) declaration of a ``"vector"`` backbone, for the escnn-span penalty: velocity frames are
    escnn's frequency-1 fields of SO(2) (``rot2dOnR2(-1).irrep(1)``, which a quarter turn maps as
    ``(u, v) -> (-v, u)``, the C4 ``VELOCITY`` above) and the hidden channels are SO(2) scalars
    (``trivial_repr``): the backbone's pointwise ReLU commutes with every rotation only on scalars.
    (C4's regular fields have no SO(2) counterpart that a pointwise ReLU keeps.)  ``widths`` are the
    channel counts between the convs, ``kernels`` their sizes; one ``projkernels.steerable`` per conv."""
    from escnn import gspaces
    from escnn import nn as enn

    from ..symmetry.steerable import steerable

    gs = gspaces.rot2dOnR2(-1)
    last = len(widths) - 2

    def field_type(channels: int, velocity: bool):
        return enn.FieldType(gs, [gs.irrep(1)] * (channels // 2) if velocity else [gs.trivial_repr] * channels)

    return [steerable(field_type(cin, i == 0), field_type(cout, i == last), k)
            for i, (cin, cout, k) in enumerate(zip(widths[:-1], widths[1:], kernels))]


def rotate_velocity(x: torch.Tensor, k: int) -> torch.Tensor:
    """r^k on velocity frames ``(..., 2 * frames, H, W)`` (pairs (u, v) per frame)."""
    k %= ORDER
    y = torch.rot90(x, k, dims=(-2, -1))
    if k == 0:
        return y
    u, v = y.unflatten(-3, (-1, 2)).unbind(-3)
    for _ in range(k):
        u, v = -v, u
    return torch.stack((u, v), -3).flatten(-4, -3)


def lift(x: torch.Tensor) -> torch.Tensor:
    """Velocity frames ``(B, 2F, H, W)`` -> one regular field per frame ``(B, 4F, H, W)``: (u, v, -u, -v)."""
    uv = x.unflatten(1, (-1, 2))
    return torch.cat((uv, -uv), 2).flatten(1, 2)


def read_out(c: torch.Tensor) -> torch.Tensor:
    """One regular field per frame ``(B, 4F, H, W)`` -> velocity ``(B, 2F, H, W)``: the vector component."""
    c = c.unflatten(1, (-1, ORDER))
    return ((c[:, :, :2] - c[:, :, 2:]) / 2).flatten(1, 2)
