"""The compiled backends: "cpp" (CPU tensors) and "cuda" (CUDA tensors), from ``projkernels._C``.

Importing ``projkernels._C`` loads the library whose static initialisers register the
``projkernels_C::`` ops.  Two layers of ops:

Public ops (csrc/public_ops.cpp, autograd in csrc/autograd.cpp), what the API calls:

    penalty_energy(weight, table[], geometry[]) -> (penalty, eq_energy)
    penalty_energy_backward(weight, grad_penalty, grad_eq, table[], geometry[]) -> dW
    project(weight, table[], geometry[]) -> P(W)
    spectrum(weight, table[], geometry[]) -> [n_irreps]           (not differentiable)
    multi_penalty(weights[], offsets[], inv_stab[], consts, geometry[])
        -> (total_penalty, total_eq_energy, penalty [L], eq_energy [L])
    multi_penalty_backward(weights[], grad_penalty [L], grad_eq [L], offsets[], inv_stab[], consts,
                           geometry[]) -> dW[]

The steerable ops (csrc/steerable_ops.cpp, CUDA kernels in csrc/steerable_kernels.cu) take the
same arguments, with ``table`` and ``geometry`` the layout of ``SteerableSymmetry.layout(device,
dtype).native``, and return the same shapes (so they share the fake kernels below):

    steerable_penalty_energy(weight, table[], geometry[]) -> (penalty, eq_energy)
    steerable_penalty_energy_backward(weight, grad_penalty, grad_eq, table[], geometry[]) -> dW
    steerable_project(weight, table[], geometry[]) -> P(W)

``table`` is ``OrbitTable.device_tables(device, dtype)`` as a list (with ``spectrum=False`` for every op
but ``spectrum``, so that the isotypic basis is built only for the spectrum) and ``geometry`` is
``OrbitTable.geometry``; the multi-tensor arguments come from ``multi_table.NativeMultiArgs``.
Their autograd is registered in C++ for the Autograd key (double backward included), and the
dispatcher picks the CPU or CUDA kernel.  penalty_energy is the training op: it computes no
spectrum.

Raw kernels (csrc/ops.cpp, csrc/kernels.cu, csrc/multi_kernels.cu), which the public ops call:

    fused_forward(weight, offsets, inv_stab, basis, row_irrep, n_irreps, c_out, c_in, stride_out,
                  stride_in, with_spectrum=True) -> (penalty, eq_energy, spectrum)
    fused_backward(weight, grad_penalty, grad_eq, offsets, inv_stab, c_out, c_in, stride_out,
                   stride_in) -> dW
    multi_forward(weights[], offsets[], inv_stab[], geometry) -> (penalty [L], eq_energy [L])
    multi_backward(weights[], grad_penalty [L], grad_eq [L], offsets[], inv_stab[], geometry) -> dW[]
    cuda_enabled() -> bool

``penalty`` and ``eq_energy`` are 0-dim and ``spectrum`` is [n_irreps], all in the accumulation
dtype (``orbits.acc_dtype``); ``fused_forward`` with ``with_spectrum=False`` does not compute the
spectrum and returns zeros in its place.  ``dW`` has the weight's shape and dtype and is contiguous.
Sums over orbits use fixed chunks combined in a fixed order, so results are bitwise reproducible;
a layer's multi-op result on CPU equals its ``fused_forward`` result bit for bit.

This module raises ImportError when the extension is missing, which ``load_optional_backends``
takes as "not built".
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch

try:
    from . import _C  # noqa: F401  (imported for its side effect: the op registrations)
except ImportError as exc:  # not built, or built against another torch
    raise ImportError(f"projkernels._C is not available: {exc}") from exc

from .backends import Backend, MultiKernels, register_backend
from .orbits import OrbitTable, acc_dtype

__all__ = ["WITH_CUDA", "OPS", "fused_forward", "fused_backward", "multi_forward", "multi_backward", "forward",
           "backward", "project", "spectrum", "multi_op_args"]

OPS = torch.ops.projkernels_C
WITH_CUDA: bool = bool(OPS.cuda_enabled())


# --- fake (meta) kernels, for torch.compile and opcheck ------------------------------------------

def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((), dtype=acc_dtype(t.dtype))


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.register_fake("projkernels_C::fused_forward")
def _fused_forward_fake(weight, offsets, inv_stab, basis, row_irrep, n_irreps, c_out, c_in, stride_out,
                        stride_in, with_spectrum=True):
    torch._check(n_irreps >= 1, lambda: f"fused_forward: n_irreps must be positive, got {n_irreps}")
    return _scalar(weight), _scalar(weight), weight.new_empty((n_irreps,), dtype=acc_dtype(weight.dtype))


@torch.library.register_fake("projkernels_C::fused_backward")
def _fused_backward_fake(weight, grad_penalty, grad_eq, offsets, inv_stab, c_out, c_in, stride_out, stride_in):
    return _like(weight)


@torch.library.register_fake("projkernels_C::multi_forward")
def _multi_forward_fake(weights, offsets, inv_stab, geometry):
    torch._check(len(weights) >= 1, lambda: "multi_forward: weights is empty")
    acc = acc_dtype(weights[0].dtype)
    n = len(weights)
    return weights[0].new_empty((n,), dtype=acc), weights[0].new_empty((n,), dtype=acc)


@torch.library.register_fake("projkernels_C::multi_backward")
def _multi_backward_fake(weights, grad_penalty, grad_eq, offsets, inv_stab, geometry):
    torch._check(len(weights) >= 1, lambda: "multi_backward: weights is empty")
    return [_like(w) for w in weights]


@torch.library.register_fake("projkernels_C::penalty_energy")
def _penalty_energy_fake(weight, table, geometry):
    return _scalar(weight), _scalar(weight)


@torch.library.register_fake("projkernels_C::penalty_energy_backward")
def _penalty_energy_backward_fake(weight, grad_penalty, grad_eq, table, geometry):
    return _like(weight)


@torch.library.register_fake("projkernels_C::project")
def _project_fake(weight, table, geometry):
    return _like(weight)


if hasattr(OPS, "steerable_penalty_energy"):  # an extension built with the steerable ops
    torch.library.register_fake("projkernels_C::steerable_penalty_energy")(_penalty_energy_fake)
    torch.library.register_fake("projkernels_C::steerable_penalty_energy_backward")(_penalty_energy_backward_fake)
    torch.library.register_fake("projkernels_C::steerable_project")(_project_fake)


@torch.library.register_fake("projkernels_C::spectrum")
def _spectrum_fake(weight, table, geometry):
    return weight.new_empty((geometry[0],), dtype=acc_dtype(weight.dtype))


@torch.library.register_fake("projkernels_C::multi_penalty")
def _multi_penalty_fake(weights, offsets, inv_stab, consts, geometry):
    torch._check(len(weights) >= 1, lambda: "multi_penalty: weights is empty")
    n, w = len(weights), weights[0]
    acc = acc_dtype(w.dtype)
    return _scalar(w), _scalar(w), w.new_empty((n,), dtype=acc), w.new_empty((n,), dtype=acc)


@torch.library.register_fake("projkernels_C::multi_penalty_backward")
def _multi_penalty_backward_fake(weights, grad_penalty, grad_eq, offsets, inv_stab, consts, geometry):
    return [_like(w) for w in weights]


# --- thin wrappers over the raw ops, taking an OrbitTable (tests and tools) -----------------------

def fused_forward(w: torch.Tensor, table: OrbitTable, with_spectrum: bool = True):
    """(penalty, eq_energy, spectrum) of ``w`` from one pass over its entries (zeros for the
    spectrum when ``with_spectrum=False``)."""
    d = table.device_tables(w.device, w.dtype, spectrum=with_spectrum)
    g = table.geometry
    return OPS.fused_forward(w, d.offsets, d.inv_stab, d.basis, d.row_irrep, *g, with_spectrum)


def fused_backward(w: torch.Tensor, table: OrbitTable, grad_pen: torch.Tensor, grad_eq: torch.Tensor):
    """2 grad_pen (W - P(W)) + 2 grad_eq P(W), in the weight's dtype."""
    d = table.device_tables(w.device, w.dtype, spectrum=False)
    return OPS.fused_backward(w, grad_pen, grad_eq, d.offsets, d.inv_stab, *table.geometry[1:])


@functools.lru_cache(maxsize=64)
def multi_op_args(tables: Sequence[OrbitTable], device: str):
    """(offsets[], inv_stab[], geometry) of the raw multi ops for these layers, on ``device``."""
    d = [t.device_tables(device, spectrum=False) for t in tables]
    geometry = [g for t in tables for g in t.geometry[1:]]
    return [x.offsets for x in d], [x.inv_stab for x in d], geometry


def multi_forward(weights: Sequence[torch.Tensor], tables: Sequence[OrbitTable]):
    """Per-layer (penalty [L], eq_energy [L]) of weights that share a dtype and a device."""
    return OPS.multi_forward(list(weights), *multi_op_args(tuple(tables), str(weights[0].device)))


def multi_backward(weights: Sequence[torch.Tensor], tables: Sequence[OrbitTable], grad_pen: torch.Tensor,
                   grad_eq: torch.Tensor) -> List[torch.Tensor]:
    """2 grad_pen[l] (W_l - P W_l) + 2 grad_eq[l] P W_l for every layer l, each in its weight's dtype."""
    offsets, inv_stab, geometry = multi_op_args(tuple(tables), str(weights[0].device))
    return OPS.multi_backward(list(weights), grad_pen, grad_eq, offsets, inv_stab, geometry)


# --- the backend functions (no autograd: the Python paths and per-layer use call these) -----------

def forward(w, table):
    """(penalty, eq_energy) through the training op (no spectrum computed)."""
    return OPS.penalty_energy.default(w, list(table.device_tables(w.device, w.dtype, spectrum=False)), table.geometry)


def backward(w, table, grad_pen, grad_eq):
    return OPS.penalty_energy_backward.default(
        w, grad_pen, grad_eq, list(table.device_tables(w.device, w.dtype, spectrum=False)), table.geometry)


def project(w, table):
    return OPS.project.default(w, list(table.device_tables(w.device, w.dtype, spectrum=False)), table.geometry)


def spectrum(w, table):
    return OPS.spectrum.default(w, list(table.device_tables(w.device, w.dtype)), table.geometry)


def _cpp_why_unavailable(device: torch.device) -> Optional[str]:
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return "the 'cpp' backend serves CPU tensors; a CUDA tensor must use backend='cuda'"
    return f"the 'cpp' backend serves CPU tensors, not {device.type} tensors"


def _cuda_why_unavailable(device: torch.device) -> Optional[str]:
    if not WITH_CUDA:
        return "projkernels._C was not built with CUDA (reinstall with nvcc and a CUDA build of torch)"
    if not torch.cuda.is_available():
        return "no GPU: torch.cuda.is_available() is False"
    if device.type != "cuda":
        return f"tensor on {device.type}; the 'cuda' backend needs a CUDA tensor (use backend='cpp' on CPU)"
    return None


# native=True: whole models go through the public multi-tensor op (one call per dtype, autograd in
# C++), never through Python multi-tensor kernels, so there are none to give.
_MULTI = MultiKernels(forward=None, backward=None, concatenated=False, native=True)
register_backend(Backend("cpp", forward, backward, project, spectrum, _cpp_why_unavailable, multi=_MULTI,
                         native=True))
if WITH_CUDA:
    register_backend(Backend("cuda", forward, backward, project, spectrum, _cuda_why_unavailable, multi=_MULTI,
                             native=True))
