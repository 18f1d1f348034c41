"""Read symmetries off escnn models, and attach them to escnn's exported plain-PyTorch models.

escnn is optional: it is imported only when one of these functions runs.  Two kinds of symmetry
come out (``kind``):

- ``"group_average"``: a finite group's ``(group, in_rep, out_rep)``.  The conventions of
  docs/design.md (Conventions) are escnn's for ``rot2dOnR2(N)``, ``flipRot2dOnR2(N)`` and
  ``flip2dOnR2()`` with the default (vertical) reflection axis, and for ``octaOnR3()`` (group
  ``"O"``) and ``fullOctaOnR3()`` (``"Oh"``), using ``regular_repr`` / ``trivial_repr`` fields or any
  other field whose matrices are signed permutations that projkernels knows (projkernels/reps.py:
  the irreps that are signed permutations, quotient reps; checked matrix by matrix), so an
  ``R2Conv``'s or ``R3Conv``'s exported weight has penalty 0 under the symmetry read here.  A side
  whose fields are all of one type maps to that type's name, a mixed side to the list of names.  Other
  reflection axes, or a 3-D gspace whose elements act on R^3 by other matrices (an adjoint),
  relabel the group elements, so this kind rejects them rather than silently mismatching.
- ``"steerable"``: a ``SteerableSymmetry`` (projkernels/symmetry/steerable.py) read off the layer's own basis
  expansion: any gspace escnn builds the layer on (SO(2), O(2), SO(3), O(3), finite ones), any field
  types, and escnn's ``Linear`` on ``no_base_space(G)``.  P is the projection onto the span of the
  very basis the layer expands its filter from, so the layer's exported weight has penalty ~0.

``kind="auto"`` (the default) keeps the group average wherever it applies (a finite group with
signed-permutation fields that acts exactly on the kernel) and reads a steerable symmetry
otherwise; escnn ``Linear`` layers always give a steerable one.
"""
from __future__ import annotations

import copy
import hashlib
import math
from typing import Dict

import numpy as np
import torch
from torch import nn

from .groups import get_group
from .model import Symmetry, attach_symmetry
from .orbits import orbit_table
from .reps import canonical_rep, rep_names, side_of
from .symmetry.steerable import SteerableSymmetry

__all__ = ["symmetry_from_r2conv", "symmetry_from_r3conv", "symmetry_from_linear", "steerable_from_layer",
           "symmetries_from_escnn", "from_escnn_export", "KINDS"]

KINDS = ("auto", "group_average", "steerable")


def _escnn():
    try:
        import escnn.nn as enn  # noqa: F401
        import escnn.gspaces as gspaces  # noqa: F401
    except ImportError as err:
        from .install_hints import escnn_hint
        raise ImportError(f"projkernels.escnn_interop needs escnn ({escnn_hint()}); "
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


def _field_name(rep, group, gspace, side: str, i: int, where: str) -> str:
    """Our name of an escnn field representation: escnn's name where we know it and its matrices are
    ours (element by element, in the shared element order), else any of our reps with its matrices."""
    if rep.is_trivial():
        return "trivial"
    if rep.name == gspace.regular_repr.name and rep.size == gspace.fibergroup.order():
        return "regular"
    try:
        theirs = np.stack([np.asarray(rep(e), dtype=np.float64) for e in gspace.fibergroup.elements])
    except Exception as err:  # noqa: BLE001 - a continuous group has no element list
        raise ValueError(f"{where}: {side} field {i}: {err}") from None
    names = rep_names(group)
    candidates = ([rep.name] if rep.name in names else []) + [n for n in names if n != rep.name]
    for name in candidates:
        ours = side_of(group, name).rep
        if ours.size == rep.size and np.allclose(ours.matrices(), theirs, atol=1e-9):
            return name
    raise ValueError(f"{where}: {side} field {i} has representation {rep.name!r}, whose matrices are not signed "
                     f"permutations projkernels knows for {group.name}; register them with register_rep, or use "
                     "kind='steerable'")


def _rep_name(field_type, side: str, where: str, group_name: str):
    """One name (every field of that type) or the list of names (a direct sum, escnn's field order)."""
    gspace = field_type.gspace
    group = get_group(group_name)
    names = [_field_name(rep, group, gspace, side, i, where) for i, rep in enumerate(field_type.representations)]
    return names[0] if len(set(names)) == 1 else names


def _check_kind(kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def _group_average_r2(conv, name: str) -> Symmetry:
    group = _group_name(conv.in_type.gspace)
    sym = Symmetry(group, canonical_rep(_rep_name(conv.in_type, "in_type", name, group)),
                   canonical_rep(_rep_name(conv.out_type, "out_type", name, group)))
    k = conv.kernel_size
    shape = (conv.out_type.size, conv.in_type.size // conv.groups, k, k)
    try:
        orbit_table(shape, sym.group, sym.in_rep, sym.out_rep)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return sym


def _group_average_r3(conv, name: str) -> Symmetry:
    try:
        group = _cube_group_name(conv.in_type.gspace)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    sym = Symmetry(group, canonical_rep(_rep_name(conv.in_type, "in_type", name, group)),
                   canonical_rep(_rep_name(conv.out_type, "out_type", name, group)))
    k = conv.kernel_size
    shape = (conv.out_type.size, conv.in_type.size // getattr(conv, "groups", 1), k, k, k)
    try:
        orbit_table(shape, sym.group, sym.in_rep, sym.out_rep)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return sym


def _of_kind(layer, name: str, kind: str, group_average) -> Symmetry:
    """The group average when ``kind`` asks for it (``"auto"``: where it applies), else the steerable
    symmetry.  Every ValueError of the group-average route says why the layer is not a finite-group
    ``(group, in_rep, out_rep)`` layer; ``"auto"`` then reads the layer's own basis instead."""
    _check_kind(kind)
    if kind != "steerable":
        try:
            return group_average(layer, name)
        except ValueError:
            if kind == "group_average":
                raise
    return Symmetry(steerable_from_layer(layer, name))


def symmetry_from_r2conv(conv, name: str = "R2Conv", *, kind: str = "auto") -> Symmetry:
    """The symmetry of an escnn ``R2Conv``, checked against its filter shape (out, in, k, k).

    ``kind="group_average"``: the finite group's ``(group, in_rep, out_rep)`` (C_N / D_N with fields whose
    matrices are signed permutations projkernels knows, projkernels/reps.py; ValueError otherwise); ``"steerable"``: the layer's own basis as
    a ``SteerableSymmetry`` (any gspace and field types); ``"auto"``: the first where it applies, else
    the second."""
    enn = _escnn().nn
    if not isinstance(conv, enn.R2Conv):
        raise TypeError(f"{name}: expected an escnn.nn.R2Conv, got {type(conv).__name__}")
    return _of_kind(conv, name, kind, _group_average_r2)


def symmetry_from_r3conv(conv, name: str = "R3Conv", *, kind: str = "auto") -> Symmetry:
    """The symmetry of an escnn ``R3Conv``, checked against its filter shape (out, in, k, k, k):
    ``kind`` as for ``symmetry_from_r2conv``; the group average serves ``octaOnR3()`` (``"O"``) and
    ``fullOctaOnR3()`` (``"Oh"``) with signed-permutation fields (the 3-D vector rep among them)."""
    enn = _escnn().nn
    if not isinstance(conv, enn.R3Conv):
        raise TypeError(f"{name}: expected an escnn.nn.R3Conv, got {type(conv).__name__}")
    return _of_kind(conv, name, kind, _group_average_r3)


def symmetry_from_linear(linear, name: str = "Linear") -> Symmetry:
    """The steerable symmetry of an escnn ``Linear`` (field types on ``no_base_space(G)``), for the
    ``nn.Linear`` its ``export()`` gives."""
    enn = _escnn().nn
    if not isinstance(linear, enn.Linear):
        raise TypeError(f"{name}: expected an escnn.nn.Linear, got {type(linear).__name__}")
    return Symmetry(steerable_from_layer(linear, name))


_FROM_LAYERS: Dict[tuple, SteerableSymmetry] = {}


def steerable_from_layer(layer, name: str = "layer") -> SteerableSymmetry:
    """The ``SteerableSymmetry`` of an escnn ``R2Conv``, ``R3Conv`` or ``Linear``, from the basis the
    layer itself expands its weight from.

    Why the layer's basis and not its options: escnn folds ``frequencies_cutoff``, ``maximum_offset``
    and a custom ``basis_filter`` into one filter closure and keeps only the derived rings, sigmas
    and maximum frequency, and the sampling grid also depends on ``dilation``; the layer's sampled
    basis is the one thing that holds all of them, so P is built from it: its analytic basis sampled
    again in float64 at the layer's own points, as for ``steerable()`` (docs/steerable.md, Sampling).  Layers with equal field types, kernel size and sampled basis share one symmetry
    object (so they share the configuration caches); the layer itself is not kept.
    """
    enn = _escnn().nn
    if isinstance(layer, (enn.R2Conv, enn.R3Conv)):
        if layer.groups != 1:
            raise ValueError(f"{name}: grouped convolutions (groups={layer.groups}) are not supported; use groups=1")
        kernel_size = layer.kernel_size
    elif isinstance(layer, enn.Linear):
        kernel_size = None
    else:
        raise TypeError(f"{name}: expected an escnn.nn.R2Conv, R3Conv or Linear, got {type(layer).__name__}")
    key = (type(layer).__name__, layer.in_type, layer.out_type, kernel_size, _basis_digest(layer.basisexpansion))
    sym = _FROM_LAYERS.get(key)
    if sym is None:
        try:
            sym = SteerableSymmetry(layer.in_type, layer.out_type, kernel_size, None, layer=layer)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from None
        sym = _FROM_LAYERS.setdefault(key, sym)
    return sym


def _basis_digest(expansion) -> str:
    """A fingerprint of a basis expansion's buffers (its sampled bases, one per pair of field
    representations), by name, shape and float64 bytes: float32 and float64 copies of one basis agree."""
    h = hashlib.sha256()
    for buf_name, buf in sorted(expansion.named_buffers(), key=lambda item: item[0]):
        data = buf.detach().to("cpu", torch.float64).contiguous()
        h.update(repr((buf_name, tuple(data.shape))).encode())
        h.update(data.numpy().tobytes())
    return h.hexdigest()


def symmetries_from_escnn(model, *, kind: str = "auto") -> Dict[str, Symmetry]:
    """``{module name: Symmetry}`` for every ``R2Conv``, ``R3Conv`` and ``Linear`` in ``model`` (module
    order); ``kind`` as for ``symmetry_from_r2conv`` (a ``Linear``'s symmetry is always steerable)."""
    enn = _escnn().nn
    _check_kind(kind)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, enn.R2Conv):
            out[name] = symmetry_from_r2conv(m, name or "model", kind=kind)
        elif isinstance(m, enn.R3Conv):
            out[name] = symmetry_from_r3conv(m, name or "model", kind=kind)
        elif isinstance(m, enn.Linear):
            out[name] = symmetry_from_linear(m, name or "model")
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


def from_escnn_export(model, *, kind: str = "auto") -> nn.Module:
    """Export an escnn model to plain PyTorch and attach each ``R2Conv``'s, ``R3Conv``'s and ``Linear``'s
    symmetry (``kind`` as for ``symmetry_from_r2conv``) to its ``Conv2d``, ``Conv3d`` and ``nn.Linear``.

    ``model`` is an escnn module with ``export()`` (e.g. ``SequentialModule``, ``R2Conv``) or a plain
    ``nn.Module`` holding escnn modules (those are exported, the rest is copied).  ``model`` itself is
    not changed.  Layers are matched by name where the export keeps names (``SequentialModule`` does),
    else by module order within each layer type.  The result is in eval mode where escnn's
    ``export()`` puts it there.  Biases are attached with the weights: ``model_penalty`` and
    ``project_`` treat them as docs/steerable.md (Biases) and projkernels/model.py describe.
    """
    syms = symmetries_from_escnn(model, kind=kind)
    enn = _escnn().nn
    escnn_layers = dict(model.named_modules())
    plain_type = {n: _PLAIN_TYPE[next(t for t in _PLAIN_TYPE if isinstance(escnn_layers[n], getattr(enn, t)))]
                  for n in syms}
    exported = _exported_copy(model)  # leaves ``model`` (and its mode) untouched
    by_name = dict(exported.named_modules())
    if all(isinstance(by_name.get(n), plain_type[n]) for n in syms):
        pairs = [(by_name[n], s, n) for n, s in syms.items()]
    else:
        pairs = []
        for escnn_type, layer_type in _PLAIN_TYPE.items():
            names = [n for n in syms if plain_type[n] is layer_type]
            if not names:
                continue
            layers = [m for m in exported.modules() if isinstance(m, layer_type)]
            if len(names) != len(layers):
                raise ValueError(f"model: found {len(names)} {escnn_type} layers but {len(layers)} "
                                 f"{layer_type.__name__} layers in the export and their names differ; attach the "
                                 "symmetries by hand with attach_symmetry")
            pairs += [(m, syms[n], n) for n, m in zip(names, layers)]
    for layer, sym, name in pairs:
        attach_symmetry(layer, sym.group, sym.in_rep, sym.out_rep, name=name)  # errors name the layer
    return exported


# the plain layer that each escnn layer's export() gives
_PLAIN_TYPE = {"R2Conv": nn.Conv2d, "R3Conv": nn.Conv3d, "Linear": nn.Linear}
