"""The one backend registry and the one ``backend=`` resolver.

A backend is registered once, by name, with the slots it fills:

- ``single`` (finite groups, one weight): ``forward(w, table) -> (penalty, eq_energy)``,
  ``backward(w, table, g_pen, g_eq) -> dW``, ``project`` and ``spectrum``, over a contiguous weight
  and its ``OrbitTable``, in the accumulation dtype (``orbits.acc_dtype``) except ``backward``, whose
  result the caller casts to the weight's dtype; ``bind(table, device, dtype)`` optionally binds
  the configuration's calls itself (the compiled backends: public C++ ops with C++ autograd),
  otherwise the configuration calls the Python autograd of projkernels/library/autograd.py;
- ``multi`` (finite groups, many weights): ``MultiKernels``; a backend with only the single slot
  serves many weights layer by layer;
- ``decay``: ``apply(targets, weights, tables, coef_dev, coef_mean)``, the in-place update of
  projkernels/decay.py;
- ``steerable``: ``SteerableKernels``, the calls of a steerable symmetry's configuration;
- ``stack`` (optional, no slot of its own): ``StackKernels``, one finite configuration's kernels on a
  stack ``(N, *shape)`` of its weights in one call, which is how ``torch.func.vmap`` over the penalty
  family runs (projkernels/library/autograd.py, ``StackCalls``); without them the entries run one by one.

``why_unavailable(device)`` says, once per backend, whether it can serve tensors on ``device``.
``resolve(backend, device, slot)`` is the one place a name becomes a backend: ``"auto"`` takes the
first available backend of ``AUTO_ORDER[device.type]`` that fills the slot (for every slot alike),
an explicit name the backend itself, or a RuntimeError that says why it cannot serve.  Names are an
open set: ``register_backend`` adds one, and every ``backend=`` argument accepts it from then on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch

from ..groups import short_repr
from ..install_hints import extension_hint

__all__ = ["Backend", "MultiKernels", "SteerableKernels", "StackKernels", "BACKENDS", "AUTO_ORDER", "SLOTS", "register_backend",
           "register_multi_kernels", "unregister_backend", "resolve", "available_backends", "backend_names",
           "check_backend_name", "why_unavailable", "ON_CHANGE"]

# Fastest first, per device type; "reference" serves every device and every slot.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
# The backends that come with the package: valid names even where one is not built or installed
# (``why_unavailable`` then says how to get it).
BUILTIN = ("reference", "cpp", "cuda", "triton")
SLOTS = ("single", "multi", "decay", "steerable")


@dataclass(frozen=True)
class MultiKernels:
    """``forward(x, table) -> (per_layer_penalty [L], per_layer_eq [L])`` and
    ``backward(x, table, grad_penalty [L], grad_eq [L]) -> dx`` for a ``MultiTable``.  With
    ``concatenated=True`` x is the weights concatenated into one buffer and dx a buffer in the
    accumulation dtype; otherwise x is the list of contiguous weights and dx their gradients.
    ``bind(table, device, dtypes)``: the compiled backends' whole-model op bound to the layers'
    tables (autograd in C++) instead of these calls."""
    forward: Optional[Callable]
    backward: Optional[Callable]
    concatenated: bool = True
    bind: Optional[Callable] = None


@dataclass(frozen=True)
class SteerableKernels:
    """``bind(sym, device, dtype) -> (penalty_energy, project, op_args)``: the calls of a steerable
    symmetry's configuration, each ``f(weight, *op_args)``.  ``auto=False``: served when named,
    never picked by ``backend="auto"``."""
    bind: Callable
    auto: bool = True


@dataclass(frozen=True)
class StackKernels:
    """``forward(ws, table) -> (penalty [N], eq_energy [N])`` and ``backward(ws, table, g_pen [N],
    g_eq [N]) -> dW`` (stacked like ``ws``) over a contiguous stack ``ws`` of N weights sharing one
    ``OrbitTable``; ``project(ws, table) -> P ws`` optionally (otherwise the single-weight projection
    runs once on the stack folded into the output-channel dim)."""
    forward: Callable
    backward: Callable
    project: Optional[Callable] = None


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Optional[Callable]
    backward: Optional[Callable]
    project: Optional[Callable]
    spectrum: Optional[Callable]
    why_unavailable: Callable[[torch.device], Optional[str]]
    multi: Optional[MultiKernels] = None
    bind: Optional[Callable] = None
    decay: Optional[Callable] = None
    steerable: Optional[SteerableKernels] = None
    stack: Optional[StackKernels] = None

    @property
    def native(self) -> bool:
        """Whether its single-weight calls are bound ops with their own (C++) autograd."""
        return self.bind is not None

    def fills(self, slot: str) -> bool:
        if slot == "single":
            return self.forward is not None
        if slot == "multi":
            return self.multi is not None or self.forward is not None  # layer by layer
        if slot == "decay":
            return self.decay is not None
        if slot == "steerable":
            return self.steerable is not None
        raise ValueError(f"slot: expected one of {SLOTS}, got {slot!r}")


BACKENDS: Dict[str, Backend] = {}
# Called after every change of the registry: the caches of validated configurations hold resolved
# backends and must forget them.
ON_CHANGE: List[Callable[[], None]] = []


def _changed() -> None:
    for fn in ON_CHANGE:
        fn()


def register_backend(backend: Backend) -> None:
    """Register (or replace) a backend under its name; ``backend=<name>`` accepts it from now on."""
    if not isinstance(backend.name, str) or not backend.name or backend.name == "auto":
        raise ValueError(f"backend.name: expected a non-empty str other than 'auto', got {backend.name!r}")
    BACKENDS[backend.name] = backend
    _changed()


def unregister_backend(name: str) -> None:
    """Remove backend ``name`` (tests that register a stand-in restore the registry with this)."""
    BACKENDS.pop(name, None)
    _changed()


def register_multi_kernels(name: str, kernels: Optional[MultiKernels], why_unavailable=None) -> None:
    """Give backend ``name`` multi-tensor kernels (None removes them).  A name with no backend yet is
    registered as a multi-tensor-only backend."""
    if name in BACKENDS:
        BACKENDS[name] = replace(BACKENDS[name], multi=kernels)
        _changed()
    else:
        register_backend(Backend(name, None, None, None, None, why_unavailable or (lambda device: None),
                                 multi=kernels))


def backend_names():
    """Every name ``backend=`` accepts: "auto", the built-in backends, then the registered ones."""
    return ("auto",) + BUILTIN + tuple(n for n in BACKENDS if n not in BUILTIN)


def check_backend_name(backend, slot: str = "single") -> str:
    """``backend`` if it names a backend ("auto", a built-in one, or a registered one), else the error
    (for the steerable slot it lists the backends that serve it)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {backend_names()} (str), got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS and backend not in BUILTIN:
        if slot == "steerable":
            names = [n for n in backend_names() if n in BUILTIN + ("auto",) or BACKENDS[n].fills(slot)]
            raise ValueError(f"backend: {short_repr(backend)} does not serve steerable symmetries; they are served by "
                             f"{', '.join(repr(b) for b in names)}")
        raise ValueError(f"backend: unknown backend {short_repr(backend)}; expected one of {backend_names()}")
    return backend


_NOT_THERE = {
    "cpp": lambda: ("the C++ extension projkernels._C is not built or did not import (it needs a C++ compiler "
                    f"and torch at install time); rebuild it: {extension_hint()}"),
    "cuda": lambda: ("the extension was built without its CUDA kernels (they are compiled only when nvcc and a "
                     "CUDA build of torch are there and a GPU is visible at install time, or PROJKERNELS_CUDA=1); "
                     f"rebuild: {extension_hint(cuda=True)}"),
    "triton": lambda: "Triton is not installed (pip install triton)",
}
_WITHOUT = {
    "single": "has no single-weight kernels",
    "multi": "has no kernels for weights",
    "decay": "has no decay kernels (rebuild the extension if it predates them)",
    "steerable": "does not serve steerable symmetries (rebuild the extension if it predates them)",
}
_WHAT = {"single": "serve a weight", "multi": "serve a weight", "decay": "run the decay",
         "steerable": "serve this steerable symmetry"}


def why_unavailable(name: str, device, slot: str = "single") -> Optional[str]:
    """None when backend ``name`` can serve tensors on ``device`` in ``slot``, else the reason it cannot."""
    device = torch.device(device)
    if name == "cuda" and device.type != "cuda":
        # The tensor's device is the first reason, whatever was built.
        return "the cuda backend serves CUDA tensors only (move the weight with .cuda(), or use backend='auto')"
    b = BACKENDS.get(name)
    if b is None:
        return _NOT_THERE.get(name, lambda: "not registered")()
    if not b.fills(slot):
        return f"the {name!r} backend {_WITHOUT[slot]}"
    return b.why_unavailable(device)


def resolve(backend: str, device, slot: str = "single") -> Backend:
    """The backend that serves ``slot`` on ``device``; a clear RuntimeError if an explicit one cannot."""
    check_backend_name(backend, slot)
    device = torch.device(device)
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            b = BACKENDS.get(name)
            if (b is not None and b.fills(slot) and (slot != "steerable" or b.steerable.auto)
                    and b.why_unavailable(device) is None):
                return b
        return BACKENDS["reference"]
    reason = why_unavailable(backend, device, slot)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot {_WHAT[slot]} on {device}: {reason}")
    return BACKENDS[backend]


def available_backends(device="cpu", slot: str = "single", auto_first: bool = False):
    """Names of the backends that can serve ``slot`` on ``device`` (``auto_first``: those of the
    device's "auto" order first, in that order)."""
    device = torch.device(device)
    names = backend_names()[1:]
    if auto_first:
        first = AUTO_ORDER.get(device.type, ("reference",))
        names = first + tuple(n for n in names if n not in first)
    return [n for n in names if why_unavailable(n, device, slot) is None]
