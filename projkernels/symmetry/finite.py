"""The finite groups (C<N>, D<N>, the cube groups O / Oh / T, and groups given as data) as a kind of
symmetry: a layer is described by its orbit table (projkernels/orbits.py), a bias projects onto the
vectors that every rho_out(g) fixes: the field means for regular fields, the fixed space of the
field's rep for the other signed-permutation fields (zero for a field with no trivial component,
a vector field for instance)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..groups import get_group, group_name_for_ops
from ..library.autograd import EAGER, FiniteCalls
from ..orbits import acc_dtype, check_weight, field_size, orbit_table
from ..reps import canonical_rep, side_of

__all__ = ["FiniteKind", "FINITE", "SUPPORTED_LAYERS", "field_means", "field_deviation_sq"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def field_means(fields: torch.Tensor) -> torch.Tensor:
    """The projection of a [fields, |G|] bias: each regular field replaced by its mean (a bias is
    equivariant exactly when it is constant on every regular field)."""
    return fields.mean(dim=1, keepdim=True).expand_as(fields)


def field_deviation_sq(fields: torch.Tensor) -> torch.Tensor:
    """||b - P(b)||^2 of a [fields, |G|] bias, from its deviations from the field means."""
    return (fields - field_means(fields)).square().sum()


def _check_module(module, name: str = "module") -> None:
    if not isinstance(module, SUPPORTED_LAYERS):
        raise TypeError(f"{name}: expected nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(module).__name__}")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups != 1:
        # A grouped conv's weight is (out, in/groups, ...): its dim 1 is not the layer's input space.
        raise ValueError(f"{name}: grouped convolutions (groups={module.groups}) are not supported; "
                         "use groups=1")


def _check_bias(bias, size: int, name: str) -> None:
    if bias.numel() % size:
        raise ValueError(f"{name}: expected a multiple of the output field size {size} entries, got {bias.numel()}")


class FiniteKind:
    """The symmetry protocol (projkernels/symmetry/__init__.py) for finite groups."""
    slot = "single"          # the backend slot that serves one weight
    multi_fused = True       # many weights go through one multi-tensor table
    shardable = True         # served on sharded (DTensor / FSDP2) models
    custom_ops = True        # under torch.compile: the Python custom ops, the group passed by name

    def describe(self, shape, dtype, device, group, in_rep, out_rep):
        """The layer's orbit table, validated (shapes, dtypes and devices only)."""
        name = group_name_for_ops(group)
        in_rep, out_rep = canonical_rep(in_rep, "in_rep"), canonical_rep(out_rep, "out_rep")
        return orbit_table(tuple(int(s) for s in shape), name, in_rep, out_rep)

    def check_weight(self, weight, group) -> None:
        check_weight(weight)

    def bind(self, impl, table, device, dtype):
        """(calls, op_args) of a configuration: the backend's own binding (the compiled ops), or the
        Python autograd over its single-weight kernels."""
        if impl.bind is not None:
            return impl.bind(table, device, dtype)
        return EAGER, (FiniteCalls(table, impl),)

    def attach(self, module, group, in_rep, out_rep):
        """``attach_symmetry``'s check of a layer: the group to store, validated against the weight."""
        _check_module(module)
        group_name = group_name_for_ops(group)
        in_rep, out_rep = canonical_rep(in_rep, "in_rep"), canonical_rep(out_rep, "out_rep")
        orbit_table(module.weight, group_name, in_rep, out_rep)
        return get_group(group_name).name, in_rep, out_rep

    def check_layer(self, module, group, in_rep, out_rep) -> None:
        orbit_table(module.weight, group, in_rep, out_rep)

    def table(self, weight, group, in_rep, out_rep):
        """The orbit table that the fused decay uses for this weight."""
        return orbit_table(weight, group, in_rep, out_rep)

    def bias_table(self, n: int, group, out_rep):
        """A bias as an (n, 1) weight from a trivial input to the output fields: its orbit table's P is
        (1/|G|) sum_g rho_out(g) b, the projection onto the fixed space of rho_out (the field means for
        regular fields); None when every bias is equivariant (trivial fields)."""
        if out_rep == "trivial":
            return None
        return orbit_table((n, 1), get_group(group).name, "trivial", out_rep)

    def bias_fields(self, group, out_rep) -> Optional[int]:
        """The field size of a bias that projects to its field means (fused with the weights), else None."""
        return field_size("regular", get_group(group)) if out_rep == "regular" else None

    def bias_per_layer(self, group, out_rep) -> bool:
        """Whether a bias has a projection of its own, computed layer by layer: the signed-permutation
        fields other than trivial and regular."""
        return out_rep not in ("trivial", "regular")

    def _bias_projector(self, group, out_rep, vector):
        """(field size, [size, size] projector onto the fixed space of rho_out) in the accumulation dtype."""
        side = side_of(get_group(group), out_rep, "out_rep")
        u = torch.as_tensor(side.rep.fixed_space(), dtype=acc_dtype(vector.dtype), device=vector.device)
        return side.size, u @ u.T

    def bias_deviation_sq(self, bias, group, out_rep, name="bias") -> Optional[torch.Tensor]:
        if out_rep == "trivial":
            return None
        size = self.bias_fields(group, out_rep)
        if size is not None:
            return field_deviation_sq(bias.view(-1, size))
        size, proj = self._bias_projector(group, out_rep, bias)
        _check_bias(bias, size, name)
        b = bias.reshape(-1, size).to(proj.dtype)
        return (b - b @ proj).square().sum()  # from the residual, never ||b||^2 - ||P b||^2

    def project_bias(self, vector, group, out_rep, name="bias") -> Optional[torch.Tensor]:
        if out_rep == "trivial":
            return None
        size = self.bias_fields(group, out_rep)
        if size is not None:
            return field_means(vector.view(-1, size)).reshape(vector.shape)
        size, proj = self._bias_projector(group, out_rep, vector)
        _check_bias(vector, size, name)
        return (vector.reshape(-1, size).to(proj.dtype) @ proj).to(vector.dtype).reshape(vector.shape)

    def irrep_names(self, group) -> Optional[Tuple[str, ...]]:
        return tuple(get_group(group).irrep_names)


FINITE = FiniteKind()
