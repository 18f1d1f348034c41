"""Read symmetries off escnn models, and attach them to escnn's exported plain-PyTorch models.

escnn is optional: it is imported only when one of these functions runs.  The conventions of
docs/design.md (Conventions) are escnn's for ``rot2dOnR2(N)``, ``flipRot2dOnR2(N)`` and
``flip2dOnR2()`` with the default (vertical) reflection axis, and for ``octaOnR3()`` (group ``"O"``) and
``fullOctaOnR3()`` (``"Oh"``), using ``regular_repr`` / ``trivial_repr`` fields, so an ``R2Conv``'s or
``R3Conv``'s exported weight has penalty 0 under the symmetry read here.  Other reflection axes, or a
3-D gspace whose elements act on R^3 by other matrices (an adjoint), relabel the group elements, so
they are rejected rather than silently mismatched.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Tuple

import numpy as np
from torch import nn

from .groups import get_group
from .model import Symmetry, attach_symmetry
from .orbits import orbit_table

__all__ = ["symmetry_from_r2conv", "symmetry_from_r3conv", "symmetries_from_escnn", "from_escnn_export"]


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


def _cube_group_name(gspace) -> str:
    """"O" or "Oh" for escnn's ``octaOnR3()`` / ``fullOctaOnR3()``; checked element by element: every
    element, in escnn's order, must move R^3 by the matrix projkernels' group has at that index."""
    group = gspace.fibergroup
    name = {24: "O", 48: "Oh"}.get(group.order())
    if name is None or getattr(gspace, "dimensionality", None) != 3:
        raise ValueError(f"gspace: expected octaOnR3() or fullOctaOnR3(), got {gspace} (projkernels' 3-D groups are "
                         "the cube's: 'O', 'Oh', and its subgroup 'T')")
    ours = get_group(name).matrices
    try:
        theirs = np.stack([np.asarray(gspace.basespace_action(e), dtype=np.float64) for e in group.elements])
    except Exception as err:  # noqa: BLE001 - a group escnn cannot list (continuous) is not a cube group
        raise ValueError(f"gspace: expected octaOnR3() or fullOctaOnR3(), got {gspace}: {err}") from None
    if theirs.shape != ours.shape or not np.allclose(theirs, ours, atol=1e-9):
        raise ValueError(f"gspace: {gspace} lists its {group.order()} elements, or moves R^3 with them, differently "
                         f"from escnn's default {'octaOnR3()' if name == 'O' else 'fullOctaOnR3()'} (an adjoint or "
                         f"another subgroup); only the default matches projkernels' element labels of {name!r}")
    return name


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


def symmetry_from_r3conv(conv, name: str = "R3Conv") -> Symmetry:
    """The ``(group, in_rep, out_rep)`` of an escnn ``R3Conv`` on ``octaOnR3()`` (``"O"``) or
    ``fullOctaOnR3()`` (``"Oh"``), checked against its filter shape (out, in, k, k, k)."""
    enn = _escnn().nn
    if not isinstance(conv, enn.R3Conv):
        raise TypeError(f"{name}: expected an escnn.nn.R3Conv, got {type(conv).__name__}")
    try:
        group = _cube_group_name(conv.in_type.gspace)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    sym = Symmetry(group, _rep_name(conv.in_type, "in_type", name), _rep_name(conv.out_type, "out_type", name))
    k = conv.kernel_size
    shape = (conv.out_type.size, conv.in_type.size // getattr(conv, "groups", 1), k, k, k)
    try:
        orbit_table(shape, sym.group, sym.in_rep, sym.out_rep)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return sym


def symmetries_from_escnn(model) -> Dict[str, Symmetry]:
    """``{module name: Symmetry}`` for every ``R2Conv`` and ``R3Conv`` in ``model`` (module order)."""
    enn = _escnn().nn
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, enn.R2Conv):
            out[name] = symmetry_from_r2conv(m, name or "model")
        elif isinstance(m, enn.R3Conv):
            out[name] = symmetry_from_r3conv(m, name or "model")
    return out


def _export(module):
    """escnn's ``export()`` of one escnn module, leaving the module as it was.

    ``export()`` switches the module to eval mode, so every submodule's mode is put back afterwards,
    and the export's tensors are cloned, since escnn hands out the module's own cached filter.
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        out = module.export()
    finally:
        for m, mode in modes:  # parents first: a parent's train() also sets its children
            if m.training != mode:
                m.train(mode)
    for t in list(out.parameters()) + list(out.buffers()):
        t.data = t.data.clone()
    return out


def _exported_copy(model):
    """A plain-PyTorch copy of ``model``: escnn parts through their ``export()``, the rest deep-copied.

    The escnn modules are never deep-copied (for a module built on the cube groups that fails inside
    escnn, whose group elements are hashed before they are rebuilt): the outermost ones are exported
    first and handed to ``copy.deepcopy`` as the copies of themselves.
    """
    enn = _escnn().nn
    if isinstance(model, enn.EquivariantModule):
        return _export(model)
    memo = {}
    inside = set()
    for m in model.modules():  # parents before children
        if isinstance(m, enn.EquivariantModule) and id(m) not in inside:
            memo[id(m)] = _export(m)
            inside.update(id(c) for c in m.modules())
    return copy.deepcopy(model, memo)


def from_escnn_export(model) -> nn.Module:
    """Export an escnn model to plain PyTorch and attach each ``R2Conv``'s (``R3Conv``'s) symmetry to its
    Conv2d (Conv3d).

    ``model`` is an escnn module with ``export()`` (e.g. ``SequentialModule``, ``R2Conv``) or a plain
    ``nn.Module`` holding escnn modules (those are exported, the rest is copied).  ``model`` itself is
    not changed.  Convs are matched by name where the export keeps names (``SequentialModule`` does),
    else by module order.  The result is in eval mode where escnn's ``export()`` puts it there.
    """
    syms = symmetries_from_escnn(model)
    exported = _exported_copy(model)  # leaves ``model`` (and its mode) untouched
    convs: List[Tuple[str, nn.Module]] = [(n, m) for n, m in exported.named_modules()
                                          if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    by_name = dict(convs)
    if all(n in by_name for n in syms):
        pairs = [(by_name[n], s, n) for n, s in syms.items()]
    elif len(convs) == len(syms):
        pairs = [(m, s, n) for (n, m), s in zip(convs, syms.values())]
    else:
        raise ValueError(f"model: found {len(syms)} R2Conv / R3Conv layers but {len(convs)} Conv2d / Conv3d layers "
                         "in the export and their names differ; attach the symmetries by hand with attach_symmetry")
    for conv, sym, name in pairs:
        attach_symmetry(conv, sym.group, sym.in_rep, sym.out_rep, name=name)  # errors name the layer
    return exported
