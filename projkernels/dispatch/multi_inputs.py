"""The ``items`` argument of ``multi_penalty``: collecting the weights, and validating them once."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..groups import group_name_for_ops
from ..orbits import check_weight, orbit_table
from ..reps import canonical_rep

__all__ = ["collect", "validate"]


def _unpack(item, i: int):
    if isinstance(item, (tuple, list)):
        if len(item) != 4:
            raise ValueError(f"items[{i}]: expected (weight, group, in_rep, out_rep), got {len(item)} entries")
        return tuple(item)
    try:
        return item.weight, item.group, item.in_rep, item.out_rep
    except AttributeError:
        raise TypeError(f"items[{i}]: expected a (weight, group, in_rep, out_rep) tuple or an object with "
                        f"those attributes, got {type(item).__name__}") from None


def _canonical(rep, name: str, i: int) -> str:
    try:
        return canonical_rep(rep, name)
    except (TypeError, ValueError) as e:
        raise type(e)(f"items[{i}]: {e}") from None


def collect(items) -> Tuple[List[torch.Tensor], tuple]:
    """(weights, key): the key is what a validated configuration is cached under, one
    (shape, dtype, device, group, in_rep, out_rep) per item.  Raises the per-item errors when an
    item is malformed (its weight not a tensor, a wrong entry count)."""
    weights, key = [], []
    for i, item in enumerate(items):
        if type(item) is tuple and len(item) == 4:
            w, g, a, b = item
        else:
            w, g, a, b = _unpack(item, i)
        if not isinstance(w, torch.Tensor) or w.layout is not torch.strided:
            try:
                check_weight(w)
            except (TypeError, ValueError) as e:
                raise type(e)(f"items[{i}]: {e}") from None
        if type(a) is not str or type(b) is not str:  # direct sums as lists: their canonical strings
            a, b = _canonical(a, "in_rep", i), _canonical(b, "out_rep", i)
        weights.append(w)
        key.append((w.shape, w.dtype, w.device, g, a, b))
    return weights, tuple(key)


def check_item(shape, dtype, group, in_rep, out_rep, i: int) -> tuple:
    """Validate one item from its key entry; returns its (shape, group name, in_rep, out_rep)."""
    try:
        check_weight(torch.empty(shape, dtype=dtype, device="meta"))  # the weight's own errors
    except (TypeError, ValueError) as e:
        raise type(e)(f"items[{i}]: {e}") from None
    in_rep, out_rep = _canonical(in_rep, "in_rep", i), _canonical(out_rep, "out_rep", i)
    shape, name = tuple(int(s) for s in shape), group_name_for_ops(group, f"items[{i}]: group")
    try:
        orbit_table(shape, name, in_rep, out_rep)
    except (TypeError, ValueError) as e:
        raise type(e)(f"items[{i}]: {e}") from None
    return shape, name, in_rep, out_rep


def validate(key: tuple) -> List[tuple]:
    """Every item's table key from ``collect``'s key (shapes, dtypes and devices only, never tensor
    data, so that torch.compile can build it while tracing); all weights on one device."""
    specs = [check_item(shape, dtype, g, a, b, i) for i, (shape, dtype, _, g, a, b) in enumerate(key)]
    device = key[0][2]
    for i, entry in enumerate(key):
        if entry[2] != device:
            raise ValueError(f"items[{i}]: weight is on {entry[2]}, but items[0] is on {device}; "
                             "all weights must be on one device")
    return specs
