"""Fake (meta) kernels of the compiled steerable ops, for torch.compile and opcheck.

The ops themselves (csrc/steerable_ops.cpp: schemas, CPU kernels, C++ autograd; CUDA kernels in
csrc/steerable_kernels.cu) take the layout that ``SteerableSymmetry.layout(device, dtype).native``
holds, built once per device and dtype:

    steerable_penalty_energy(weight, table[], geometry[]) -> (penalty, eq_energy)
    steerable_penalty_energy_backward(weight, grad_penalty, grad_eq, table[], geometry[])
        -> 2 grad_penalty (W - P W) + 2 grad_eq P W
    steerable_project(weight, table[], geometry[]) -> P W

``penalty`` and ``eq_energy`` are 0-dim in the accumulation dtype (``orbits.acc_dtype``); the
other results have the weight's shape and dtype and are contiguous.  projkernels.native imports
this module, so the fake kernels are registered wherever the ops are.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (the op registrations; ImportError when the extension is not built)
from .orbits import acc_dtype

__all__ = []


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((), dtype=acc_dtype(t.dtype))


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


if hasattr(torch.ops.projkernels_C, "steerable_penalty_energy"):  # an extension built with the steerable ops
    @torch.library.register_fake("projkernels_C::steerable_penalty_energy")
    def _penalty_energy_fake(weight, table, geometry):
        return _scalar(weight), _scalar(weight)

    @torch.library.register_fake("projkernels_C::steerable_penalty_energy_backward")
    def _penalty_energy_backward_fake(weight, grad_penalty, grad_eq, table, geometry):
        return _like(weight)

    @torch.library.register_fake("projkernels_C::steerable_project")
    def _project_fake(weight, table, geometry):
        return _like(weight)
