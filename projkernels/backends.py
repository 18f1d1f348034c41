"""Backend registry and the resolution of the public functions' ``backend=`` argument.

A backend implements four functions over a contiguous weight and its ``OrbitTable``:
``forward -> (penalty, eq_energy)``, ``backward -> dW``, ``project -> P(W)`` and ``spectrum``,
all in the accumulation dtype (float64 for float64 weights, float32 otherwise) except ``backward``,
whose result the caller casts to the weight's dtype.  ``unavailable(device)`` returns None when the
backend can serve tensors on ``device``, else the reason it cannot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from . import reference

__all__ = ["Backend", "BACKENDS", "register_backend", "resolve", "available_backends"]

BACKEND_NAMES = ("auto", "reference", "cpp", "cuda", "triton")
# Fastest first, per device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    project: Callable
    spectrum: Callable
    unavailable: Callable[[torch.device], Optional[str]]


BACKENDS: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


register_backend(Backend(
    name="reference",
    forward=reference.forward,
    backward=reference.backward,
    project=reference.project,
    spectrum=reference.spectrum,
    unavailable=lambda device: None,
))


def load_optional_backends() -> None:
    """Register the compiled and Triton backends where they can be imported; skip them otherwise."""
    import importlib
    for module in ("projkernels.cpp_backend", "projkernels.triton_backend"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # not built / not installed: resolve() says so when asked for it


def check_backend_name(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKEND_NAMES} (str), got {type(backend).__name__}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
    return backend


def _why_missing(name: str, device: torch.device) -> Optional[str]:
    if name not in BACKENDS:
        return {
            "cpp": "the C++ extension projkernels._C is not built (reinstall with a C++ compiler: pip install .)",
            "cuda": "the CUDA extension is not built (needs nvcc and a CUDA build of torch at install time)",
            "triton": "Triton is not installed",
        }.get(name, "not registered")
    return BACKENDS[name].unavailable(device)


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend that serves a weight on ``device``; a clear RuntimeError if an explicit one cannot."""
    check_backend_name(backend)
    device = torch.device(device)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if _why_missing(name, device) is None:
                return BACKENDS[name]
        return BACKENDS["reference"]
    reason = _why_missing(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot serve a weight on {device}: {reason}")
    return BACKENDS[backend]


def available_backends(device="cpu"):
    """Names of the backends that can serve a weight on ``device``, fastest first."""
    device = torch.device(device)
    return [n for n in BACKEND_NAMES[1:] if _why_missing(n, device) is None]
