"""The compiled backends: "cpp" (CPU tensors) and "cuda" (CUDA tensors), from ``projkernels._C``.

Importing ``projkernels._C`` loads the library whose static initialisers register the
``projkernels_C::`` ops (csrc/ops.cpp, csrc/kernels.cu):

    fused_forward(weight, offsets, inv_stab, basis, row_irrep, n_irreps, c_out, c_in, stride_out,
                  stride_in, with_spectrum=True) -> (penalty, eq_energy, spectrum)
    fused_backward(weight, grad_penalty, grad_eq, offsets, inv_stab, c_out, c_in, stride_out,
                   stride_in) -> dW
    cuda_enabled() -> bool

``penalty`` and ``eq_energy`` are 0-dim and ``spectrum`` is [n_irreps], all in the accumulation
dtype (float64 for float64 weights, float32 otherwise); with ``with_spectrum=False`` the spectrum is
not computed and comes back as zeros.  ``dW`` has the weight's shape and dtype and is contiguous.
Sums over orbits use fixed chunks combined in a fixed order, so results are bitwise reproducible.

This module raises ImportError when the extension is missing, which ``load_optional_backends``
takes as "not built".
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

try:
    from . import _C  # noqa: F401  (imported for its side effect: the op registrations)
except ImportError as exc:  # not built, or built against another torch
    raise ImportError(f"projkernels._C is not available: {exc}") from exc

from .backends import Backend, register_backend
from .orbits import OrbitTable
from .reference import acc_dtype

__all__ = ["WITH_CUDA", "fused_forward", "fused_backward"]

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
if WITH_CUDA:
    register_backend(Backend(name="cuda", forward=_forward, backward=_backward, project=_project,
                             spectrum=_spectrum, unavailable=_cuda_unavailable))
