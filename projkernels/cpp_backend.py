"""The compiled backends: "cpp" (CPU tensors) and "cuda" (CUDA tensors), from ``projkernels._C``.

Importing ``projkernels._C`` loads the library whose static initialisers register the
``projkernels_C::`` ops (csrc/ops.cpp, csrc/kernels.cu):

    fused_forward(weight, offsets, inv_stab, basis, row_irrep, n_irreps, c_out, c_in, stride_out,
                  stride_in, with_spectrum=True) -> (penalty, eq_energy, spectrum)
    fused_backward(weight, grad_penalty, grad_eq, offsets, inv_stab, c_out, c_in, stride_out,
                   stride_in) -> dW
    multi_forward(weights[], offsets[], inv_stab[], geometry) -> (penalty [L], eq_energy [L])
    multi_backward(weights[], grad_penalty [L], grad_eq [L], offsets[], inv_stab[], geometry) -> dW[]
    cuda_enabled() -> bool

``penalty`` and ``eq_energy`` are 0-dim and ``spectrum`` is [n_irreps], all in the accumulation
dtype (float64 for float64 weights, float32 otherwise); with ``with_spectrum=False`` the spectrum is
not computed and comes back as zeros.  ``dW`` has the weight's shape and dtype and is contiguous.
Sums over orbits use fixed chunks combined in a fixed order, so results are bitwise reproducible.

The ``multi_*`` ops take a whole model's weights (one dtype, one device; ``geometry`` lists
(c_out, c_in, stride_out, stride_in) per weight) and cost one pass per direction: on CUDA one
forward launch plus one fixed-order second-stage launch, and one backward launch, whatever the
number of layers.  They serve ``projkernels.multi.multi_penalty`` as the multi-tensor backends
"cpp" and "cuda" registered below, which group the layers by dtype and call the ops once per
dtype present (one launch per direction when all weights share a dtype).  A layer's multi-op result
on CPU equals its ``fused_forward`` result bit for bit.

This module raises ImportError when the extension is missing, which ``load_optional_backends``
takes as "not built".
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch

try:
    from . import _C  # noqa: F401  (imported for its side effect: the op registrations)
except ImportError as exc:  # not built, or built against another torch
    raise ImportError(f"projkernels._C is not available: {exc}") from exc

from .backends import Backend, register_backend
from .multi import MultiBackend, register_multi_backend
from .orbits import OrbitTable
from .reference import acc_dtype

__all__ = ["WITH_CUDA", "fused_forward", "fused_backward", "multi_forward", "multi_backward"]

_ops = torch.ops.projkernels_C
WITH_CUDA: bool = bool(_ops.cuda_enabled())


# --- fake (meta) kernels, for torch.compile and opcheck ------------------------------------------

@torch.library.register_fake("projkernels_C::fused_forward")
def _fused_forward_fake(weight, offsets, inv_stab, basis, row_irrep, n_irreps, c_out, c_in, stride_out,
                        stride_in, with_spectrum=True):
    acc = acc_dtype(weight.dtype)
    torch._check(n_irreps >= 1, lambda: f"fused_forward: n_irreps must be positive, got {n_irreps}")
    return (weight.new_empty((), dtype=acc), weight.new_empty((), dtype=acc),
            weight.new_empty((n_irreps,), dtype=acc))


@torch.library.register_fake("projkernels_C::fused_backward")
def _fused_backward_fake(weight, grad_penalty, grad_eq, offsets, inv_stab, c_out, c_in, stride_out, stride_in):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("projkernels_C::multi_forward")
def _multi_forward_fake(weights, offsets, inv_stab, geometry):
    torch._check(len(weights) >= 1, lambda: "multi_forward: weights is empty")
    acc = acc_dtype(weights[0].dtype)
    n = len(weights)
    return weights[0].new_empty((n,), dtype=acc), weights[0].new_empty((n,), dtype=acc)


@torch.library.register_fake("projkernels_C::multi_backward")
def _multi_backward_fake(weights, grad_penalty, grad_eq, offsets, inv_stab, geometry):
    torch._check(len(weights) >= 1, lambda: "multi_backward: weights is empty")
    return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]


# --- thin wrappers over the ops, taking an OrbitTable --------------------------------------------

def _geometry(table: OrbitTable) -> Tuple[int, int, int, int]:
    return table.c_out, table.c_in, table.stride_out, table.stride_in


def fused_forward(w: torch.Tensor, table: OrbitTable, with_spectrum: bool = True):
    """(penalty, eq_energy, spectrum) of ``w`` from one pass over its entries."""
    d = table.to(w.device)
    return _ops.fused_forward(w, d["offsets"], d["inv_stab"], d["basis"], d["row_irrep"],
                              len(table.group.irrep_names), *_geometry(table), with_spectrum)


def fused_backward(w: torch.Tensor, table: OrbitTable, grad_pen: torch.Tensor, grad_eq: torch.Tensor):
    """2 grad_pen (W - P(W)) + 2 grad_eq P(W), in the weight's dtype."""
    d = table.to(w.device)
    return _ops.fused_backward(w, grad_pen, grad_eq, d["offsets"], d["inv_stab"], *_geometry(table))


@functools.lru_cache(maxsize=64)
def _multi_args(tables: Tuple[OrbitTable, ...], device: str):
    """(offsets[], inv_stab[], geometry) of the multi ops for these layers, on ``device``."""
    d = [t.to(device) for t in tables]
    geometry = [g for t in tables for g in _geometry(t)]
    return [x["offsets"] for x in d], [x["inv_stab"] for x in d], geometry


def multi_forward(weights: Sequence[torch.Tensor], tables: Sequence[OrbitTable]):
    """Per-layer (penalty [L], eq_energy [L]) of weights that share a dtype and a device."""
    return _ops.multi_forward(list(weights), *_multi_args(tuple(tables), str(weights[0].device)))


def multi_backward(weights: Sequence[torch.Tensor], tables: Sequence[OrbitTable], grad_pen: torch.Tensor,
                   grad_eq: torch.Tensor) -> List[torch.Tensor]:
    """2 grad_pen[l] (W_l - P W_l) + 2 grad_eq[l] P W_l for every layer l, each in its weight's dtype."""
    offsets, inv_stab, geometry = _multi_args(tuple(tables), str(weights[0].device))
    return _ops.multi_backward(list(weights), grad_pen, grad_eq, offsets, inv_stab, geometry)


def _dtype_groups(weights) -> List[List[int]]:
    groups: Dict[torch.dtype, List[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w.dtype, []).append(i)
    return list(groups.values())


def _multi_forward(weights, table):
    groups = _dtype_groups(weights)
    if len(groups) == 1:
        return multi_forward(weights, table.tables)
    # One call per dtype; the results are scattered back into the caller's layer order.
    acc = functools.reduce(torch.promote_types, (acc_dtype(w.dtype) for w in weights))
    pens, eqs = [], []
    for idx in groups:
        p, e = multi_forward([weights[i] for i in idx], [table.tables[i] for i in idx])
        pens.append(p.to(acc))
        eqs.append(e.to(acc))
    order = torch.tensor([i for idx in groups for i in idx], device=weights[0].device)
    pen = torch.empty(len(weights), dtype=acc, device=weights[0].device)
    eq = torch.empty_like(pen)
    pen[order] = torch.cat(pens)
    eq[order] = torch.cat(eqs)
    return pen, eq


def _multi_backward(weights, table, grad_pen, grad_eq):
    groups = _dtype_groups(weights)
    if len(groups) == 1:
        acc = acc_dtype(weights[0].dtype)
        return multi_backward(weights, table.tables, grad_pen.to(acc), grad_eq.to(acc))
    out: List[Optional[torch.Tensor]] = [None] * len(weights)
    for idx in groups:
        acc = acc_dtype(weights[idx[0]].dtype)
        sel = torch.tensor(idx, device=grad_pen.device)
        grads = multi_backward([weights[i] for i in idx], [table.tables[i] for i in idx],
                               grad_pen.index_select(0, sel).to(acc), grad_eq.index_select(0, sel).to(acc))
        for i, g in zip(idx, grads):
            out[i] = g
    return out


_CONSTANTS: Dict[Tuple[str, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}


def _project_grads(w: torch.Tensor):
    # P(W) is the backward with grad_pen = 0, grad_eq = 1/2; cached so a CUDA call launches no fills.
    key = (str(w.device), acc_dtype(w.dtype))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = (torch.zeros((), dtype=key[1], device=w.device),
                           torch.full((), 0.5, dtype=key[1], device=w.device))
    return _CONSTANTS[key]


def _forward(w, table):
    pen, eq, _ = fused_forward(w, table, with_spectrum=False)
    return pen, eq


def _backward(w, table, grad_pen, grad_eq):
    return fused_backward(w, table, grad_pen, grad_eq)


def _project(w, table):
    return fused_backward(w, table, *_project_grads(w))


def _spectrum(w, table):
    return fused_forward(w, table, with_spectrum=True)[2]


def _cpp_unavailable(device: torch.device) -> Optional[str]:
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return "the 'cpp' backend serves CPU tensors; a CUDA tensor must use backend='cuda'"
    return f"the 'cpp' backend serves CPU tensors, not {device.type} tensors"


def _cuda_unavailable(device: torch.device) -> Optional[str]:
    if not WITH_CUDA:
        return "projkernels._C was not built with CUDA (reinstall with nvcc and a CUDA build of torch)"
    if not torch.cuda.is_available():
        return "no GPU: torch.cuda.is_available() is False"
    if device.type != "cuda":
        return f"tensor on {device.type}; the 'cuda' backend needs a CUDA tensor (use backend='cpp' on CPU)"
    return None


register_backend(Backend(name="cpp", forward=_forward, backward=_backward, project=_project,
                         spectrum=_spectrum, unavailable=_cpp_unavailable))
register_multi_backend(MultiBackend("cpp", _multi_forward, _multi_backward, _cpp_unavailable, concatenated=False))
if WITH_CUDA:
    register_backend(Backend(name="cuda", forward=_forward, backward=_backward, project=_project,
                             spectrum=_spectrum, unavailable=_cuda_unavailable))
    register_multi_backend(MultiBackend("cuda", _multi_forward, _multi_backward, _cuda_unavailable,
                                        concatenated=False))
