"""Read symmetries off escnn models, and attach them to escnn's exported plain-PyTorch models.

escnn is optional: it is imported only when one of these functions runs.  The conventions of
docs/design.md (Conventions) are escnn's for ``rot2dOnR2(N)``, ``flipRot2dOnR2(N)`` and
``flip2dOnR2()`` with the default (vertical) reflection axis, using ``regular_repr`` / ``trivial_repr`` fields, so an
``R2Conv``'s exported weight has penalty 0 under the symmetry read here.  Other reflection axes
relabel the group elements, so they are rejected rather than silently mismatched.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Tuple

from torch import nn

from .model import Symmetry, attach_symmetry
from .orbits import orbit_table

__all__ = ["symmetry_from_r2conv", "symmetries_from_escnn", "from_escnn_export"]


def _escnn():
    try:
        import escnn.nn as enn  # noqa: F401
        import escnn.gspaces as gspaces  # noqa: F401
    except ImportError as err:
        raise ImportError("projkernels.escnn_interop needs escnn (pip install escnn); "
                          f"importing it failed: {err}") from err
    import escnn
    return escnn


def _group_name(gspace) -> str:
    n = getattr(gspace, "rotations_order", None)
    flips = getattr(gspace, "flips_order", None)
    if n is None or flips is None:
        raise ValueError(f"gspace: expected a planar gspace (rot2dOnR2, flipRot2dOnR2, flip2dOnR2), got {gspace}")
    if n < 1:
        raise ValueError(f"gspace: {gspace.name} has continuous rotations; only the finite groups C_N / D_N "
                         "(rot2dOnR2(N), flipRot2dOnR2(N), flip2dOnR2()) are supported")
    if not flips:
        return f"C{n}"
    axis2 = gspace._sg_id[0]  # escnn stores twice the reflection axis' angle
    if not math.isclose(math.remainder(axis2 - math.pi, 2 * math.pi), 0.0, abs_tol=1e-9):
        raise ValueError(f"gspace: {gspace.name} reflects about the axis at angle {axis2 / 2:.4g} rad; only the "
                         "default vertical axis (pi/2, escnn's default) matches projkernels' element labels")
    return f"D{n}"


def _rep_name(field_type, side: str, where: str) -> str:
    gspace = field_type.gspace
    kinds = set()
    for i, rep in enumerate(field_type.representations):
        if rep.is_trivial():
            kinds.add("trivial")
        elif rep.name == gspace.regular_repr.name and rep.size == gspace.fibergroup.order():
            kinds.add("regular")
        else:
            raise ValueError(f"{where}: {side} field {i} has representation {rep.name!r}; projkernels supports "
                             "fields that are all trivial_repr or all regular_repr")
        if len(kinds) > 1:
            raise ValueError(f"{where}: {side} mixes trivial and regular fields (field {i} is {rep.name!r}); "
                             "projkernels needs all fields of one side to be of one type")
    return kinds.pop()


def symmetry_from_r2conv(conv, name: str = "R2Conv") -> Symmetry:
    """The ``(group, in_rep, out_rep)`` of an escnn ``R2Conv``, checked against its filter shape."""
    enn = _escnn().nn
    if not isinstance(conv, enn.R2Conv):
        raise TypeError(f"{name}: expected an escnn.nn.R2Conv, got {type(conv).__name__}")
    group = _group_name(conv.in_type.gspace)
    sym = Symmetry(group, _rep_name(conv.in_type, "in_type", name), _rep_name(conv.out_type, "out_type", name))
    k = conv.kernel_size
    shape = (conv.out_type.size, conv.in_type.size // conv.groups, k, k)
    try:
        orbit_table(shape, sym.group, sym.in_rep, sym.out_rep)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return sym


def symmetries_from_escnn(model) -> Dict[str, Symmetry]:
    """``{module name: Symmetry}`` for every ``R2Conv`` in ``model`` (module order)."""
    enn = _escnn().nn
    return {name: symmetry_from_r2conv(m, name or "model")
            for name, m in model.named_modules() if isinstance(m, enn.R2Conv)}


def _export_in_place(module):
    """escnn's ``export()`` where the module has one; otherwise the module with its escnn parts exported."""
    enn = _escnn().nn
    if isinstance(module, enn.EquivariantModule):
        return module.export()
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _export_in_place(child)
    return module


def from_escnn_export(model) -> nn.Module:
    """Export an escnn model to plain PyTorch and attach each ``R2Conv``'s symmetry to its Conv2d.

    ``model`` is an escnn module with ``export()`` (e.g. ``SequentialModule``, ``R2Conv``) or a plain
    ``nn.Module`` holding escnn modules (those are exported, the rest is copied).  ``model`` itself is
    not changed.  Convs are matched by name where the export keeps names (``SequentialModule`` does),
    else by module order.  The result is in eval mode where escnn's ``export()`` puts it there.
    """
    syms = symmetries_from_escnn(model)
    exported = _export_in_place(copy.deepcopy(model))  # leaves ``model`` (and its mode) untouched
    convs: List[Tuple[str, nn.Module]] = [(n, m) for n, m in exported.named_modules() if isinstance(m, nn.Conv2d)]
    by_name = dict(convs)
    if all(n in by_name for n in syms):
        pairs = [(by_name[n], s, n) for n, s in syms.items()]
    elif len(convs) == len(syms):
        pairs = [(m, s, n) for (n, m), s in zip(convs, syms.values())]
    else:
        raise ValueError(f"model: found {len(syms)} R2Conv layers but {len(convs)} Conv2d layers in the export "
                         "and their names differ; attach the symmetries by hand with attach_symmetry")
    for conv, sym, name in pairs:
        attach_symmetry(conv, sym.group, sym.in_rep, sym.out_rep, name=name)  # errors name the layer
    return exported
