"""Validate once: the cache of single-weight configurations behind the public API.

A configuration is (shape, dtype, device, group, in_rep, out_rep, backend).  Its first call
validates every argument, builds the orbit table, resolves the backend and, for a native backend,
puts the table on the device; the result is a ``Config``, cached under that key.  Every later call
with the same key is one dictionary lookup and then the op: nothing is validated again, nothing is
uploaded, and the backward re-validates nothing either (it reuses the forward's tables).

Only shapes, dtypes and devices are read, never tensor data.  Under torch.compile the API skips
this cache and calls the Python custom ops (projkernels/ops.py), whose fake kernels build the
table from the shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, NamedTuple

import torch

from . import eager
from .backends import ON_CHANGE, Backend, check_backend_name, resolve
from .groups import group_name_for_ops
from .orbits import OrbitTable, check_weight, orbit_table
from .steerable import SteerableSymmetry, config as steerable_config

__all__ = ["Config", "config_for", "CONFIGS", "clear_configs"]


@dataclass(frozen=True, eq=False)
class Config:
    table: OrbitTable
    backend: Backend
    group: str                       # the name the Python custom ops take
    in_rep: str
    out_rep: str
    backend_name: str                # as the caller gave it ("auto" included)
    ops: "ConfigOps"                 # what the public functions call: ops.f(weight, *op_args)
    op_args: tuple                   # native: () (the ops hold the table); else (table, backend)


class ConfigOps(NamedTuple):
    """The three calls behind the public functions, each ``f(weight, *op_args)``: the public C++
    ops of a native backend bound to the configuration's device tables (``projkernels._C.SingleCall``),
    or the eager Python route (projkernels/eager.py) of any other backend."""
    penalty_energy: object
    project: object
    spectrum: object


def _native_ops(table: OrbitTable, device, dtype) -> ConfigOps:
    # The public C++ ops bound to this configuration's device tables (csrc/python_calls.cpp): a call
    # converts only the weight from Python, not the table, so the host cost is close to a native op's.
    # The training calls are bound to the tables without the isotypic basis; the spectrum binds the
    # full tables on its first call (_LazySpectrum), so a penalty never builds the basis.
    from ._C import SingleCall
    bound = SingleCall("penalty_energy", "project", "spectrum",
                       list(table.device_tables(device, dtype, spectrum=False)), table.geometry)
    return ConfigOps(bound.penalty_energy, bound.project, _LazySpectrum(table, device, dtype))


class _LazySpectrum:
    """A native configuration's spectrum call: the public ``spectrum`` op bound to the full device tables
    (the isotypic basis included), bound on the first call and kept.  Immutable in effect, so copies
    share it, like the bound calls."""
    __slots__ = ("_table", "_device", "_dtype", "_call")

    def __init__(self, table: OrbitTable, device, dtype):
        self._table, self._device, self._dtype, self._call = table, device, dtype, None

    def __call__(self, weight):
        call = self._call
        if call is None:
            from ._C import SingleCall
            t = self._table
            call = self._call = SingleCall("penalty_energy", "project", "spectrum",
                                           list(t.device_tables(self._device, self._dtype)), t.geometry).spectrum
        return call(weight)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


_EAGER_OPS = ConfigOps(eager.penalty_energy, eager.project, eager.spectrum)


CONFIGS: Dict[tuple, Config] = {}
_MAX_CONFIGS = 4096


def config_for(weight, group, in_rep, out_rep, backend) -> Config:
    """The configuration of this call, validated and built on a miss (the slow path)."""
    if isinstance(group, SteerableSymmetry):  # hook: escnn steerable bases (projkernels/steerable.py)
        return _steerable_config(weight, group, in_rep, out_rep, backend)
    check_weight(weight)
    return _build((weight.shape, weight.dtype, weight.device, group, in_rep, out_rep, backend))


def _build(key: tuple) -> Config:
    shape, dtype, device, group, in_rep, out_rep, backend = key
    try:
        return CONFIGS[key]
    except (KeyError, TypeError):
        pass
    check_backend_name(backend)
    name = group_name_for_ops(group)
    for arg, rep in (("in_rep", in_rep), ("out_rep", out_rep)):
        if not isinstance(rep, str):
            raise TypeError(f"{arg}: expected 'trivial' or 'regular' (str), got {type(rep).__name__}")
    table = orbit_table(tuple(int(s) for s in shape), name, in_rep, out_rep)
    impl = resolve(backend, device)
    if impl.native:
        ops, op_args = _native_ops(table, device, dtype), ()
    else:
        ops, op_args = _EAGER_OPS, (table, impl)
    cfg = Config(table, impl, name, in_rep, out_rep, backend, ops, op_args)
    try:
        if len(CONFIGS) >= _MAX_CONFIGS:
            CONFIGS.clear()
        CONFIGS[key] = cfg
    except TypeError:
        pass  # an unhashable argument that validated (none today): served, not cached
    return cfg


def _steerable_config(weight, group, in_rep, out_rep, backend):
    # A steerable configuration is "native" in the API's sense: the API calls its ops directly.
    cfg = steerable_config(weight, group, in_rep, out_rep, backend)
    if torch.compiler.is_compiling():
        # Traced calls skip the cache (as the finite-group route does): dynamo would otherwise trace
        # the dict itself, whose keys may hold groups given as data that it cannot hash.
        return cfg
    if len(CONFIGS) >= _MAX_CONFIGS:
        CONFIGS.clear()
    CONFIGS[(weight.shape, weight.dtype, weight.device, group, in_rep, out_rep, backend)] = cfg
    return cfg


def clear_configs() -> None:
    CONFIGS.clear()


ON_CHANGE.append(clear_configs)
