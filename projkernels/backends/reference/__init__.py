"""The "reference" backend: plain PyTorch, every device, every slot.

``finite``: the single-weight kernels over an orbit table (and the brute-force ground truth, the
spectral cross-check, the decay); ``multi``: the concatenated multi-tensor route; ``steerable``: the
block route of steerable symmetries."""
from ..registry import Backend, MultiKernels, StackKernels, SteerableKernels, register_backend
from . import multi, steerable
from .finite import (DOWN, UP, acc_dtype, backward, basis_spectrum, brute_force_project, decay_apply, finite_or_rescaled,
                     forward, orbit_mean, orbit_values, project, spectral_spectrum, spectrum, stack_backward,
                     stack_forward, stack_project)

__all__ = ["acc_dtype", "brute_force_project", "orbit_values", "orbit_mean", "finite_or_rescaled", "forward",
           "backward", "project", "spectrum", "spectral_spectrum", "basis_spectrum", "decay_apply"]

register_backend(Backend(
    name="reference", forward=forward, backward=backward, project=project, spectrum=spectrum,
    why_unavailable=lambda device: None,
    multi=MultiKernels(multi.reference_multi_forward, multi.reference_multi_backward, concatenated=True),
    decay=decay_apply,
    steerable=SteerableKernels(steerable.bind),
    stack=StackKernels(stack_forward, stack_backward, stack_project),
))
