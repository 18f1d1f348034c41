"""The "triton" backend's finite-group slots (single weight, and many weights layer by layer).

``PROJKERNELS_TILED=1`` in the environment (read once, when this module is imported; the same
switch as the CUDA backend's tiles) sends every weight whose field blocks fit a program's tile to
the tiled kernels (``backends.triton.kernels.plan_tiles``: contiguous loads and stores of whole field blocks,
orbits resolved on chip); any other weight, and every weight without the switch, takes the chunked
kernels.  ``uses_tiles`` says which kernels serve a weight.
"""
from __future__ import annotations

import os
import weakref
from typing import Optional

import torch

from . import kernels as K  # raises ImportError without triton
from ...orbits import OrbitTable

__all__ = ["forward", "backward", "project", "spectrum", "uses_tiles", "TILED"]

# Off by default: the tiles are for measuring against the chunked kernels (bench/gpu_check.sh).
TILED = os.environ.get("PROJKERNELS_TILED") == "1"


_TILE_PLANS: "weakref.WeakKeyDictionary[OrbitTable, dict]" = weakref.WeakKeyDictionary()


def _tile_plan(w: torch.Tensor, table: OrbitTable) -> Optional[K.TilePlan]:
    # Planned once per table and element size: a call then pays one lookup, not the planning loop.
    if not TILED:
        return None
    plans = _TILE_PLANS.setdefault(table, {})
    key = (w.element_size(), K._TILE_ENTRIES, K._GATHER_ENTRIES, K._MIN_TILES)  # the plan's every input
    if key not in plans:
        plans[key] = K.plan_tiles(table, key[0])
    return plans[key]


def uses_tiles(w: torch.Tensor, table: OrbitTable) -> bool:
    """Whether the tiled kernels serve this weight (PROJKERNELS_TILED=1 and its blocks fit a tile)."""
    return _tile_plan(w, table) is not None


def _reduce(w: torch.Tensor, table: OrbitTable, spectrum: bool):
    w = w.contiguous()
    plan = _tile_plan(w, table)
    if plan is not None:
        return K.reduce_tiles(w, table, plan, spectrum)
    return K.reduce_orbits(w, table, spectrum)


def _apply(w: torch.Tensor, table: OrbitTable, grad_pen, grad_eq, out_dtype):
    w = w.contiguous()
    plan = _tile_plan(w, table)
    if plan is not None:
        return K.apply_tiles(w, table, plan, grad_pen, grad_eq, out_dtype=out_dtype)
    return K.apply_orbits(w, table, grad_pen, grad_eq, out_dtype=out_dtype)


def forward(w: torch.Tensor, table: OrbitTable):
    return _reduce(w, table, spectrum=False)


def spectrum(w: torch.Tensor, table: OrbitTable) -> torch.Tensor:
    return _reduce(w, table, spectrum=True)


def backward(w: torch.Tensor, table: OrbitTable, grad_pen: torch.Tensor, grad_eq: torch.Tensor) -> torch.Tensor:
    # Written straight in the weight's dtype: the caller's cast is then free, and rounding the
    # float32 (float64) value once is what the cast would have done.
    device = w.device
    grad_pen = torch.as_tensor(grad_pen, device=device).reshape(())
    grad_eq = torch.as_tensor(grad_eq, device=device).reshape(())
    return _apply(w, table, grad_pen, grad_eq, out_dtype=w.dtype)


def project(w: torch.Tensor, table: OrbitTable) -> torch.Tensor:
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    return _apply(w, table, None, None, out_dtype=acc)
