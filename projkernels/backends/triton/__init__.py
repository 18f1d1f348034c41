"""The "triton" backend (registers itself on import): the finite groups' single-weight kernels
(``finite``, ``kernels``), the decay (``decay``) and steerable symmetries (``steerable``).

Serves CUDA tensors, and CPU tensors when the process was started with ``TRITON_INTERPRET=1``
(Triton's interpreter: slow, meant for tests); ``kernels.why_unavailable`` is the one check.
Importing this package without Triton installed raises ImportError, which
``projkernels.backends.load_optional_backends`` takes as "not installed".
"""
from ..registry import Backend, SteerableKernels, register_backend
from . import kernels  # raises ImportError without triton
from . import decay, finite, steerable

__all__ = ["kernels", "finite", "decay", "steerable"]

register_backend(Backend(name="triton", forward=finite.forward, backward=finite.backward, project=finite.project,
                         spectrum=finite.spectrum, why_unavailable=kernels.why_unavailable, decay=decay.apply,
                         steerable=SteerableKernels(steerable.bind)))
