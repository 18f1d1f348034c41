"""The one backend registry, for single weights and whole models, and the ``backend=`` choice.

A backend is registered once, by name, with what it can do:

- single-weight functions over a contiguous weight and its ``OrbitTable``: ``forward -> (penalty,
  eq_energy)``, ``backward -> dW``, ``project -> P(W)`` and ``spectrum``, in the accumulation dtype
  (``orbits.acc_dtype``) except ``backward``, whose result the caller casts to the weight's dtype;
- optionally multi-tensor functions (``MultiKernels``) over many weights at once;
- ``why_unavailable(device)``: None when it can serve tensors on ``device``, else the reason;
- ``native``: the public ops of the compiled extension serve its single weights, with their
  autograd in C++ (projkernels/native.py; ``MultiKernels.native`` likewise for whole models); the
  others go through the Python autograd of projkernels/ops.py and projkernels/multi_autograd.py.

``backend="auto"`` takes the first available name of ``AUTO_ORDER[device.type]``, for single
weights and for models alike; an explicit backend that cannot serve the device is a RuntimeError
that says why.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch

from . import reference
from .groups import short_repr

__all__ = ["Backend", "MultiKernels", "BACKENDS", "BACKEND_NAMES", "AUTO_ORDER", "register_backend",
           "register_multi_kernels", "unregister_backend", "resolve", "available_backends", "check_backend_name", "why_unavailable"]

BACKEND_NAMES = ("auto", "reference", "cpp", "cuda", "triton")
# Fastest first, per device type; "reference" serves every device.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}


@dataclass(frozen=True)
class MultiKernels:
    """``forward(x, table) -> (per_layer_penalty [L], per_layer_eq [L])`` and
    ``backward(x, table, grad_penalty [L], grad_eq [L]) -> dx`` for a ``MultiTable``.  With
    ``concatenated=True`` x is the weights concatenated into one buffer and dx a buffer in the
    accumulation dtype; otherwise x is the list of contiguous weights and dx their gradients.
    ``native=True``: served by the public multi-tensor op (autograd in C++) instead of these calls."""
    forward: Callable
    backward: Callable
    concatenated: bool = True
    native: bool = False


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Optional[Callable]
    backward: Optional[Callable]
    project: Optional[Callable]
    spectrum: Optional[Callable]
    why_unavailable: Callable[[torch.device], Optional[str]]
    multi: Optional[MultiKernels] = None
    native: bool = False


BACKENDS: Dict[str, Backend] = {}
# Called after every change of the registry: the caches of validated configurations hold resolved
# backends and must forget them.
ON_CHANGE: List[Callable[[], None]] = []


def _changed() -> None:
    for fn in ON_CHANGE:
        fn()


def register_backend(backend: Backend) -> None:
    """Register (or replace) a backend under its name."""
    BACKENDS[backend.name] = backend
    _changed()


def unregister_backend(name: str) -> None:
    """Remove backend ``name`` (tests that register a stand-in restore the registry with this)."""
    BACKENDS.pop(name, None)
    _changed()


def register_multi_kernels(name: str, kernels: Optional[MultiKernels], why_unavailable=None) -> None:
    """Give backend ``name`` multi-tensor kernels (None removes them).  A name with no
    single-weight backend yet is registered as a multi-tensor-only backend."""
    if name in BACKENDS:
        BACKENDS[name] = replace(BACKENDS[name], multi=kernels)
        _changed()
    else:
        register_backend(Backend(name, None, None, None, None, why_unavailable or (lambda device: None),
                                 multi=kernels))


register_backend(Backend(
    name="reference",
    forward=reference.forward,
    backward=reference.backward,
    project=reference.project,
    spectrum=reference.spectrum,
    why_unavailable=lambda device: None,
))  # its multi-tensor kernels (the concatenated route) are added by projkernels/multi_reference.py


def load_optional_backends() -> None:
    """Register the compiled and Triton backends where they can be imported; skip them otherwise."""
    import importlib
    for module in ("projkernels.native", "projkernels.triton_backend"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # not built / not installed: resolve() says so when asked for it


def check_backend_name(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKEND_NAMES} (str), got {type(backend).__name__}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown backend {short_repr(backend)}; expected one of {BACKEND_NAMES}")
    return backend


def why_unavailable(name: str, device) -> Optional[str]:
    """None when backend ``name`` can serve tensors on ``device``, else the reason it cannot."""
    device = torch.device(device)
    if name == "cuda" and device.type != "cuda":
        # The tensor's device is the first reason, whatever was built.
        return f"the cuda backend serves CUDA tensors only (move the weight with .cuda(), or use backend='auto')"
    if name not in BACKENDS:
        from .install_hints import extension_hint
        return {
            "cpp": "the C++ extension projkernels._C is not built or did not import (it needs a C++ compiler "
                   f"and torch at install time); rebuild it: {extension_hint()}",
            "cuda": "the extension was built without its CUDA kernels (they are compiled only when nvcc and a "
                    "CUDA build of torch are there and a GPU is visible at install time, or PROJKERNELS_CUDA=1); "
                    f"rebuild: {extension_hint(cuda=True)}",
            "triton": "Triton is not installed (pip install triton)",
        }.get(name, "not registered")
    return BACKENDS[name].why_unavailable(device)


def resolve(backend: str, device) -> Backend:
    """The backend that serves a weight on ``device``; a clear RuntimeError if an explicit one cannot."""
    check_backend_name(backend)
    device = torch.device(device)
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if why_unavailable(name, device) is None:
                return BACKENDS[name]
        return BACKENDS["reference"]
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot serve a weight on {device}: {reason}")
    return BACKENDS[backend]


def available_backends(device="cpu"):
    """Names of the backends that can serve a weight on ``device``, fastest first."""
    device = torch.device(device)
    return [n for n in BACKEND_NAMES[1:] if why_unavailable(n, device) is None]
