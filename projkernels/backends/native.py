"""The compiled backends: "cpp" (CPU tensors) and "cuda" (CUDA tensors), from ``projkernels._C``.

Importing ``projkernels._C`` loads the library whose static initialisers register the
``projkernels_C::`` ops.  Two layers of ops:

Public ops (csrc/ops/public_ops.cpp, autograd in csrc/autograd/autograd.cpp), what the configurations bind:

    penalty_energy(weight, table[], geometry[]) -> (penalty, eq_energy)
    penalty_energy_backward(weight, grad_penalty, grad_eq, table[], geometry[]) -> dW
    project(weight, table[], geometry[]) -> P(W)
    spectrum(weight, table[], geometry[]) -> [n_irreps]           (not differentiable)
    multi_penalty(weights[], offsets[], inv_stab[], consts, geometry[])
        -> (total_penalty, total_eq_energy, penalty [L], eq_energy [L])
    multi_penalty_backward(weights[], grad_penalty [L], grad_eq [L], offsets[], inv_stab[], consts,
                           geometry[]) -> dW[]

The steerable ops (csrc/cpu/steerable_kernels.cpp, CUDA kernels in csrc/cuda/steerable_kernels.cu) take the
same arguments, with ``table`` and ``geometry`` the layout of ``SteerableSymmetry.layout(device,
dtype).native``, and return the same shapes (so they share the fake kernels of projkernels/library/fakes.py):

    steerable_penalty_energy(weight, table[], geometry[]) -> (penalty, eq_energy)
    steerable_penalty_energy_backward(weight, grad_penalty, grad_eq, table[], geometry[]) -> dW
    steerable_project(weight, table[], geometry[]) -> P(W)

``table`` is ``OrbitTable.device_tables(device, dtype)`` as a list (with ``spectrum=False`` for every op
but ``spectrum``, so that the isotypic basis is built only for the spectrum) and ``geometry`` is
``OrbitTable.geometry``; the multi-tensor arguments come from ``MultiTable.native_args`` (projkernels/dispatch/multi_table.py).
Their autograd is registered in C++ for the Autograd key (double backward included), and the
dispatcher picks the CPU or CUDA kernel.  penalty_energy is the training op: it computes no
spectrum.

Raw kernels (csrc/cpu/orbit_kernels.cpp, csrc/cuda/orbit_kernels.cu, csrc/cuda/multi_kernels.cu), which the public ops call:

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
    from .. import _C  # noqa: F401  (imported for its side effect: the op registrations)
except ImportError as exc:  # not built, or built against another torch
    raise ImportError(f"projkernels._C is not available: {exc}") from exc

from ..library.autograd import Calls
from ..library.fakes import register_native_fakes
from ..orbits import OrbitTable, acc_dtype
from ..symmetry.steerable import no_spectrum
from .registry import Backend, MultiKernels, StackKernels, SteerableKernels, register_backend

__all__ = ["WITH_CUDA", "OPS", "fused_forward", "fused_backward", "multi_forward", "multi_backward", "forward",
           "backward", "project", "spectrum", "multi_op_args"]

OPS = torch.ops.projkernels_C
WITH_CUDA: bool = bool(OPS.cuda_enabled())


register_native_fakes(OPS)


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


# --- the slots' bindings ---------------------------------------------------------------------------

def bind(table: OrbitTable, device, dtype):
    """A configuration's calls: the public C++ ops bound to its device tables (csrc/python/python_calls.cpp).
    A call converts only the weight from Python, not the table, so the host cost is close to a native
    op's.  The training calls are bound to the tables without the isotypic basis; the spectrum binds
    the full tables on its first call (_LazySpectrum), so a penalty never builds the basis."""
    from .._C import SingleCall
    bound = SingleCall("penalty_energy", "project", "spectrum",
                       list(table.device_tables(device, dtype, spectrum=False)), table.geometry)
    return Calls(bound.penalty_energy, bound.project, _LazySpectrum(table, device, dtype)), ()


class _LazySpectrum:
    """A configuration's spectrum call: the public ``spectrum`` op bound to the full device tables
    (the isotypic basis included), bound on the first call and kept.  Immutable in effect, so copies
    share it, like the bound calls."""
    __slots__ = ("_table", "_device", "_dtype", "_call")

    def __init__(self, table: OrbitTable, device, dtype):
        self._table, self._device, self._dtype, self._call = table, device, dtype, None

    def __call__(self, weight):
        call = self._call
        if call is None:
            from .._C import SingleCall
            t = self._table
            call = self._call = SingleCall("penalty_energy", "project", "spectrum",
                                           list(t.device_tables(self._device, self._dtype)), t.geometry).spectrum
        return call(weight)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def bind_multi(table, device, dtypes):
    """The whole-model op bound to the layers' device tables: ``run(weights) -> (total_penalty,
    total_eq, penalty [L], eq [L])``, one ``projkernels_C::multi_penalty`` per dtype present (one
    for the usual single-dtype model), autograd in C++.  On CUDA the op copies nothing from the host
    (its layer descriptors are kernel arguments), so a step that calls it can be captured in a CUDA
    graph as it is."""
    from .._C import MultiCall
    by_dtype = {}
    for i, d in enumerate(dtypes):
        by_dtype.setdefault(d, []).append(i)
    groups = []
    for d, idx in by_dtype.items():
        a = (table if len(by_dtype) == 1 else table.subset(idx)).native_args(device, d)
        groups.append((idx, MultiCall(a.offsets, a.inv_stab, a.consts, a.geometry)))
    if len(groups) == 1:
        return groups[0][1]
    order = [i for idx, _ in groups for i in idx]
    inverse = torch.argsort(torch.tensor(order)).to(device)
    acc = functools.reduce(torch.promote_types, (acc_dtype(d) for d in dtypes))

    def run(weights):
        # One op per dtype; the per-layer results are put back into the caller's order.
        outs = [call([weights[i] for i in idx]) for idx, call in groups]
        total_pen = functools.reduce(torch.add, (o[0].to(acc) for o in outs))
        total_eq = functools.reduce(torch.add, (o[1].to(acc) for o in outs))
        pen = torch.cat([o[2].to(acc) for o in outs]).index_select(0, inverse)
        eq = torch.cat([o[3].to(acc) for o in outs]).index_select(0, inverse)
        return total_pen, total_eq, pen, eq
    return run


def decay_apply(targets, weights, tables, coef_dev, coef_mean) -> None:
    """The decay slot: one fused in-place pass for all layers and dtypes (``multi_decay_`` /
    ``multi_decay_grad_``), over the tables the penalty's multi ops take (cached per layer list)."""
    offsets, _, geometry = multi_op_args(tuple(tables), str(targets[0].device))
    if weights is None:
        OPS.multi_decay_(targets, offsets, geometry, coef_dev, coef_mean)
    else:
        OPS.multi_decay_grad_(targets, weights, offsets, geometry, coef_dev, coef_mean)


def bind_steerable(sym, device, dtype):
    """A steerable configuration's calls: the ``projkernels_C::steerable_*`` ops bound to the layout
    resident on the device (``Layout.native``); under torch.compile the ops themselves, with the
    table and geometry as arguments (the tracer cannot enter a bound call)."""
    compiled = sym.layout(device, acc_dtype(dtype)).native
    if torch.compiler.is_compiling():
        return Calls(OPS.steerable_penalty_energy.default, OPS.steerable_project.default, no_spectrum), \
            (compiled.table, compiled.geometry)
    from .._C import SingleCall
    bound = SingleCall("steerable_penalty_energy", "steerable_project", "", list(compiled.table),
                       list(compiled.geometry))
    return Calls(bound.penalty_energy, bound.project, no_spectrum), ()


def stack_forward(ws: torch.Tensor, table: OrbitTable):
    """(penalty [N], eq_energy [N]) of a stack of N weights sharing ``table``: one multi-tensor call."""
    return multi_forward(list(ws.unbind(0)), [table] * ws.shape[0])


def stack_backward(ws: torch.Tensor, table: OrbitTable, grad_pen: torch.Tensor, grad_eq: torch.Tensor) -> torch.Tensor:
    return torch.stack(multi_backward(list(ws.unbind(0)), [table] * ws.shape[0], grad_pen, grad_eq))


def _register(name: str, why) -> None:
    steer = None
    if hasattr(OPS, "steerable_penalty_energy"):  # an extension built with the steerable ops
        # The CUDA kernels of the steerable ops are built and tested on the CPU side only so far:
        # "auto" keeps to the routes that have run on a GPU until their GPU tests have passed.
        steer = SteerableKernels(bind_steerable, auto=name != "cuda")
    register_backend(Backend(name, forward, backward, project, spectrum, why,
                             multi=MultiKernels(None, None, concatenated=False, bind=bind_multi), bind=bind,
                             decay=decay_apply if hasattr(OPS, "multi_decay_") else None, steerable=steer,
                             stack=StackKernels(stack_forward, stack_backward)))


_register("cpp", _cpp_why_unavailable)
if WITH_CUDA:
    _register("cuda", _cuda_why_unavailable)
