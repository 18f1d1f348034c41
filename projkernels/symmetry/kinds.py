"""The symmetry protocol's steerable kind, and ``kind_of``: the one place that tells kinds apart.

Every other module asks ``kind_of(group)`` for the object that describes a layer of that symmetry
(``describe``), checks a module against it (``attach``, ``check_layer``), names the backend slot
that serves it (``slot``), and projects its biases (``bias_*``, ``project_bias``)."""
from __future__ import annotations

from typing import Optional

import torch

from ..orbits import acc_dtype
from .bias import bias_deviation_sq, prepare, project_bias
from .finite import FINITE, FiniteKind
from .steerable import SteerableSymmetry, check_module

__all__ = ["kind_of", "FiniteKind", "SteerableKind", "FINITE", "STEERABLE"]


class SteerableKind:
    """The symmetry protocol for steerable bases (escnn): the symmetry object is the layer's
    description; biases project onto each output field's trivial-isotypic part."""
    slot = "steerable"
    multi_fused = False      # one configuration per layer inside a multi-tensor call
    shardable = False        # served on sharded (DTensor / FSDP2) models
    custom_ops = False       # under torch.compile: traced through its own calls

    def describe(self, shape, dtype, device, sym, in_rep, out_rep):
        if in_rep != "trivial" or out_rep != "trivial":
            raise ValueError(f"in_rep/out_rep: a steerable symmetry carries its own field types; leave them at "
                             f"'trivial', got {in_rep!r}, {out_rep!r}")
        sym.check_weight(torch.empty(shape, dtype=dtype, device="meta"))
        sym.layout(torch.device(device), acc_dtype(dtype))  # on the device now, not inside the first op
        return sym

    def check_weight(self, weight, sym) -> None:
        sym.check_weight(weight)

    def bind(self, impl, sym, device, dtype):
        return impl.steerable.bind(sym, device, dtype)

    def attach(self, module, sym, in_rep, out_rep):
        check_module(module, sym)
        if module.bias is not None:
            prepare(sym, module.bias)
        return sym, "trivial", "trivial"

    def check_layer(self, module, sym, in_rep, out_rep) -> None:
        check_module(module, sym)

    def table(self, weight, sym, in_rep, out_rep):
        return None  # updated layer by layer through its projection

    def bias_table(self, n, sym, out_rep):
        return None

    def bias_fields(self, sym, out_rep) -> Optional[int]:
        return None

    def bias_per_layer(self, sym, out_rep) -> bool:
        return True

    def bias_deviation_sq(self, bias, sym, out_rep, name="bias"):
        return bias_deviation_sq(bias, sym, name)

    def project_bias(self, vector, sym, out_rep, name="bias"):
        return project_bias(vector, sym, name)

    def irrep_names(self, sym):
        return None  # no isotypic spectrum


STEERABLE = SteerableKind()


def kind_of(group):
    """The kind of ``group`` (a group name, a ``FiniteGroup``, or a ``SteerableSymmetry``)."""
    return STEERABLE if isinstance(group, SteerableSymmetry) else FINITE
