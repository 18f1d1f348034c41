"""Validate once: the cache of single-weight configurations behind the public API.

A configuration is (shape, dtype, device, group, in_rep, out_rep, backend).  Its first call asks the
symmetry's kind to describe the layer (``kind_of(group).describe``: validation, and the orbit table
of a finite group or the layout of a steerable symmetry), resolves the backend for the kind's slot
(``backends.resolve``) and lets the backend bind its calls to that description; the result is a
``Config``, cached under that key.  Every later call with the same key is one dictionary lookup and
then the call: nothing is validated again, nothing is uploaded, and the backward re-validates
nothing either (it reuses the forward's tables).

Only shapes, dtypes and devices are read, never tensor data.  Under torch.compile the API skips
this cache for finite groups and calls the Python custom ops (projkernels/library/custom_ops.py),
whose fake kernels build the table from the shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ..backends.registry import ON_CHANGE, Backend, check_backend_name, resolve
from ..symmetry import kind_of

__all__ = ["Config", "config_for", "config_on", "CONFIGS", "clear_configs"]


@dataclass(frozen=True, eq=False)
class Config:
    table: object                    # the layer's description: an OrbitTable, or the steerable symmetry
    backend: Backend
    in_rep: str
    out_rep: str
    backend_name: str                # as the caller gave it ("auto" included)
    ops: object                      # what the public functions call: ops.f(weight, *op_args)
    op_args: tuple


CONFIGS: Dict[tuple, Config] = {}
_MAX_CONFIGS = 4096


def config_for(weight, group, in_rep, out_rep, backend) -> Config:
    """The configuration of this call, validated and built on a miss (the slow path)."""
    kind_of(group).check_weight(weight, group)  # a dense (strided) weight from here on
    return _build((weight.shape, weight.dtype, weight.device, group, in_rep, out_rep, backend))


def config_on(shape, dtype, device, group, in_rep, out_rep, backend) -> Config:
    """A configuration from the weight's shape, dtype and device (no tensor data)."""
    return _build((shape, dtype, torch.device(device), group, in_rep, out_rep, backend))


def _build(key: tuple) -> Config:
    shape, dtype, device, group, in_rep, out_rep, backend = key
    key = key + (torch.strided,)  # the layout, as the API's lookup keys it (only dense weights get here)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        try:
            return CONFIGS[key]
        except (KeyError, TypeError):
            pass
    kind = kind_of(group)
    check_backend_name(backend, kind.slot)
    desc = kind.describe(shape, dtype, device, group, in_rep, out_rep)
    impl = resolve(backend, device, kind.slot)
    ops, op_args = kind.bind(impl, desc, device, dtype)
    cfg = Config(desc, impl, in_rep, out_rep, backend, ops, op_args)
    if compiling:
        # Traced calls skip the cache: dynamo would otherwise trace the dict itself, whose keys may
        # hold groups given as data that it cannot hash.
        return cfg
    try:
        if len(CONFIGS) >= _MAX_CONFIGS:
            CONFIGS.clear()
        CONFIGS[key] = cfg
    except TypeError:
        pass  # an unhashable argument that validated (none today): served, not cached
    return cfg


def clear_configs() -> None:
    CONFIGS.clear()


ON_CHANGE.append(clear_configs)
