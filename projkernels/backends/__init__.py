"""The backends: one registry (``registry``), and one module or package per backend that registers
itself on import: ``reference`` (plain PyTorch, always there), ``native`` ("cpp" and "cuda", the
compiled extension projkernels._C) and ``triton``.  A backend from outside the package registers
with ``register_backend`` and is named like these (docs/design.md, "Adding a backend")."""
from .registry import (AUTO_ORDER, BACKENDS, SLOTS, Backend, MultiKernels, StackKernels, SteerableKernels, available_backends,
                       backend_names, check_backend_name, register_backend, register_multi_kernels, resolve,
                       unregister_backend, why_unavailable)
from . import reference

__all__ = ["Backend", "MultiKernels", "SteerableKernels", "StackKernels", "BACKENDS", "AUTO_ORDER", "SLOTS", "register_backend",
           "register_multi_kernels", "unregister_backend", "resolve", "available_backends", "backend_names",
           "check_backend_name", "why_unavailable", "load_optional_backends"]


def load_optional_backends() -> None:
    """Register the compiled and Triton backends where they can be imported; skip them otherwise."""
    import importlib
    for module in ("projkernels.backends.native", "projkernels.backends.triton"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # not built / not installed: resolve() says so when asked for it


load_optional_backends()
