"""The bias of a layer with a steerable symmetry: its projection onto the equivariant biases.

A bias b (one number per output channel) is equivariant when ``rho_out(g) b = b`` for every g: on
each output field it lies in the trivial-isotypic subspace of the field's representation (escnn
puts its learned bias there too, through the representation's change of basis).  For a
representation ``rho = Q (direct sum of irreps) Q^-1`` the vectors fixed by every rho(g) are
``Q`` applied to the vectors supported on the trivial irreps' coordinates, so that subspace is
spanned by the columns of ``Q`` at the trivial irreps (for finite and continuous groups alike).
Each representation's basis U (d x t, orthonormal columns, t = 0 when the representation holds
no trivial irrep: the whole bias of such a field is penalised) is built once in float64; then

    P(b)_f = U U^T b_f     for every output field f of that representation,

and the penalty is the squared norm of the residual ``b - P(b)`` (never ``||b||^2 - ||U^T b||^2``),
accumulated in float32 for half biases and float64 for float64 ones.  A regular field of a finite
group holds the trivial irrep once, along the constant vector: P is then its field mean, as for
the finite-group symmetries (projkernels/model.py, Biases).
"""
from __future__ import annotations

import weakref
from typing import Dict, List, NamedTuple, Tuple

import torch

from ..orbits import acc_dtype
from .steerable import SteerableSymmetry, _orthonormal

__all__ = ["trivial_bases", "prepare", "bias_deviation_sq", "project_bias"]


class _RepBias(NamedTuple):
    """The output fields of one representation: their channels and the basis of its trivial part."""
    index: torch.Tensor   # [n_fields, d] int64 channel of each field's components
    u: torch.Tensor       # [d, t] in the accumulation dtype


_BASES: "weakref.WeakKeyDictionary[SteerableSymmetry, Dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
_LAYOUTS: "weakref.WeakKeyDictionary[SteerableSymmetry, Dict[tuple, Tuple[_RepBias, ...]]]" = \
    weakref.WeakKeyDictionary()


def _trivial_basis(rep) -> torch.Tensor:
    """[d, t] float64 orthonormal basis of the vectors that escnn's ``rep`` fixes (see above)."""
    group = rep.group
    cols, at = [], 0
    for irr in rep.irreps:
        irrep = group.irrep(*irr)
        if irrep.is_trivial():
            cols.append(at)
        at += irrep.size
    q = torch.as_tensor(rep.change_of_basis, dtype=torch.float64)
    return _orthonormal(q[:, cols])


def trivial_bases(sym: SteerableSymmetry) -> Dict[str, torch.Tensor]:
    """``{output representation name: [d, t] float64 orthonormal basis of its trivial-isotypic part}``."""
    bases = _BASES.get(sym)
    if bases is None:
        bases = {}
        for rep in sym.out_type.representations:
            if rep.name not in bases:
                bases[rep.name] = _trivial_basis(rep)
        _BASES[sym] = bases
    return bases


def _build_layout(sym: SteerableSymmetry, device: torch.device, acc: torch.dtype) -> Tuple[_RepBias, ...]:
    bases = trivial_bases(sym)
    channels: Dict[str, List[List[int]]] = {}
    at = 0
    for rep in sym.out_type.representations:
        channels.setdefault(rep.name, []).append(list(range(at, at + rep.size)))
        at += rep.size
    return tuple(_RepBias(torch.tensor(ch, dtype=torch.long, device=device),
                          bases[name].to(device=device, dtype=acc)) for name, ch in channels.items())


def _layout(sym: SteerableSymmetry, device, acc: torch.dtype) -> Tuple[_RepBias, ...]:
    per_sym = _LAYOUTS.get(sym)
    if per_sym is None:
        per_sym = _LAYOUTS[sym] = {}
    key = (torch.device(device), acc)
    lay = per_sym.get(key)
    if lay is None:
        # Built eagerly under torch.compile (a graph break), so that the cached tensors are real;
        # ``prepare`` builds it before, so that a compiled model_penalty stays one graph.
        build = torch.compiler.disable(_build_layout) if torch.compiler.is_compiling() else _build_layout
        lay = per_sym[key] = build(sym, key[0], acc)
    return lay


def prepare(sym: SteerableSymmetry, bias: torch.Tensor) -> None:
    """Build the device form for ``bias``'s device and dtype, and the CPU float32 / float64 ones
    (``attach_symmetry`` calls it, as steerable symmetries build their CPU layouts up front)."""
    for device, acc in {(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.float64),
                        (bias.device, acc_dtype(bias.dtype))}:
        _layout(sym, device, acc)


def _check(bias: torch.Tensor, sym: SteerableSymmetry, argument: str) -> None:
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{argument}: expected a torch.Tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (sym.out_type.size,):
        raise ValueError(f"{argument}: shape {tuple(bias.shape)} does not match the steerable symmetry's output "
                         f"channels ({sym.out_type.size},)")
    if not bias.is_floating_point():
        raise TypeError(f"{argument}: dtype {bias.dtype} is not a floating type")


def _fields_and_projections(bias: torch.Tensor, sym: SteerableSymmetry):
    """Per representation: (its fields [n_fields, d] in the accumulation dtype, their projections)."""
    acc = acc_dtype(bias.dtype)
    b = bias.to(acc)
    for rb in _layout(sym, bias.device, acc):
        x = b[rb.index]
        yield rb, x, (x @ rb.u) @ rb.u.T


def bias_deviation_sq(bias: torch.Tensor, sym: SteerableSymmetry, argument: str = "bias") -> torch.Tensor:
    """``||b - P(b)||^2`` (0-dim, differentiable; float32, or float64 for a float64 bias)."""
    _check(bias, sym, argument)
    total = None
    for _, x, px in _fields_and_projections(bias, sym):
        t = (x - px).square().sum()
        total = t if total is None else total + t
    return total


def project_bias(bias: torch.Tensor, sym: SteerableSymmetry, argument: str = "bias") -> torch.Tensor:
    """``P(b)``, shaped and typed like ``bias`` (every channel belongs to one output field)."""
    _check(bias, sym, argument)
    out = torch.empty(bias.shape, dtype=acc_dtype(bias.dtype), device=bias.device)
    for rb, _, px in _fields_and_projections(bias, sym):
        out[rb.index] = px
    return out.to(bias.dtype)
