"""The table of many layers at once: the layers' orbit tables, concatenated and on a device.

``multi_table`` builds a ``MultiTable`` once per list of (shape, group, reps) and caches it.  It
serves two routes:

- the concatenated route (``buckets``, ``orbit_of``): the weights as one flat buffer, all orbits of
  the layers whose groups share an order in one gather (projkernels/backends/reference/multi.py);
- the native multi-tensor op (``native_args``): per-layer device tables, the per-layer geometry and
  the [2, L] constants, uploaded once per (device, dtype) and then reused by every call.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch

from ..orbits import OrbitTable, acc_dtype, orbit_table

__all__ = ["MultiTable", "OrderBucket", "NativeMultiArgs", "multi_table"]


class NativeMultiArgs(NamedTuple):
    """The table arguments of ``projkernels_C::multi_penalty`` and ``multi_penalty_backward``."""
    offsets: List[torch.Tensor]
    inv_stab: List[torch.Tensor]
    consts: torch.Tensor        # [2, L] accumulation dtype: zeros (unused outputs), halves (P W)
    geometry: List[int]         # (c_out, c_in, stride_out, stride_in) per layer


@dataclass(frozen=True)
class OrderBucket:
    """All orbits of the layers whose group has order ``order``, as rows of one gather."""
    order: int
    index: torch.Tensor      # [n_orbits, order] flat indices into the concatenated buffer
    inv_stab: torch.Tensor   # [n_orbits] float64, 1/|Stab|
    layer: torch.Tensor      # [n_orbits] int64, the layer each orbit belongs to
    sign: object = None      # [n_orbits, order] +1 / -1, s(g, e) (signed-permutation fields); None: all +1


@dataclass(frozen=True, eq=False)
class MultiTable:
    tables: Tuple[OrbitTable, ...]      # one per layer, in the caller's order
    numels: Tuple[int, ...]
    starts: Tuple[int, ...]             # where each layer begins in the buffer
    _device_cache: Dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.tables)

    @property
    def numel(self) -> int:
        return self.starts[-1] + self.numels[-1] if self.tables else 0

    @functools.cached_property
    def _concatenated(self):
        # Built on first use only: the weight-by-weight routes never need these index tensors.
        # int32 indices gather about twice as fast as int64 on CPU; int64 only past 2^31 entries.
        itype = torch.int32 if self.numel < 2 ** 31 else torch.int64
        by_order: Dict[int, List[int]] = {}
        for i, t in enumerate(self.tables):
            by_order.setdefault(t.group.order, []).append(i)
        buckets, orbit_of, first = [], torch.empty(self.numel, dtype=itype), 0
        orbit_sign = torch.ones(self.numel, dtype=torch.int8) if any(t.signed for t in self.tables) else None
        for order, layers in sorted(by_order.items()):
            t = [self.tables[i] for i in layers]
            index = torch.cat([(x.block_bases()[:, None, None] + x.entry_offsets[None] + self.starts[i]).reshape(-1, order)
                               for i, x in zip(layers, t)]).to(itype)
            sign = None
            if any(x.signed for x in t):
                sign = torch.cat([x.gather_signs if x.signed else torch.ones(x.n_orbits, order, dtype=torch.int64)
                                  for x in t]).to(torch.int8)
                # P(W)[g . e] = s(g, e) mean; an entry met with both signs has mean 0, so either sign serves.
                orbit_sign[index.reshape(-1).long()] = sign.reshape(-1)
            inv_stab = torch.cat([x.inv_stab.repeat(x.n_blocks) for x in t])
            layer = torch.cat([torch.full((x.n_orbits,), i, dtype=torch.int64) for i, x in zip(layers, t)])
            ids = torch.arange(first, first + index.shape[0], dtype=itype)
            orbit_of[index.reshape(-1)] = ids.repeat_interleave(order)
            first += index.shape[0]
            buckets.append(OrderBucket(order, index.contiguous(), inv_stab, layer, sign))
        return tuple(buckets), orbit_of, orbit_sign

    @property
    def buckets(self) -> Tuple[OrderBucket, ...]:
        """One gather per distinct group order; orbits numbered bucket after bucket."""
        return self._concatenated[0]

    @property
    def orbit_of(self) -> torch.Tensor:
        """[numel] the orbit of each buffer entry, so that P W = orbit_means[orbit_of]."""
        return self._concatenated[1]

    @property
    def orbit_sign(self):
        """[numel] int8 s(g, e) of each buffer entry (P W = orbit_sign * orbit_means[orbit_of]); None
        when no layer has signed-permutation fields."""
        return self._concatenated[2]

    def native_args(self, device, dtype: torch.dtype) -> NativeMultiArgs:
        """The native op's table arguments on ``device`` for weights of ``dtype``, cached."""
        acc = acc_dtype(dtype)
        key = ("native", str(torch.device(device)), acc)
        if key not in self._device_cache:
            d = [t.device_tables(device, dtype, spectrum=False) for t in self.tables]
            consts = torch.zeros(2, self.n_layers, dtype=acc)
            consts[1] = 0.5
            self._device_cache[key] = NativeMultiArgs(
                [x.offsets for x in d], [x.inv_stab for x in d], consts.to(device),
                [g for t in self.tables for g in t.geometry[1:]])
        return self._device_cache[key]

    def subset(self, idx: Sequence[int]) -> "MultiTable":
        """The table of layers ``idx`` only (for example the layers of one dtype), cached."""
        return _from_tables(tuple(self.tables[i] for i in idx))

    def on(self, device: torch.device, dtype: torch.dtype):
        """(buckets, orbit_of, numels, orbit_sign) with indices on ``device`` and inv_stab in ``dtype``, cached."""
        key = (str(device), dtype)
        if key not in self._device_cache:
            buckets = tuple(OrderBucket(b.order, b.index.to(device), b.inv_stab.to(device=device, dtype=dtype),
                                        b.layer.to(device), None if b.sign is None else b.sign.to(device=device, dtype=dtype))
                            for b in self.buckets)
            numels = torch.tensor(self.numels, dtype=torch.int64, device=device)
            sign = None if self.orbit_sign is None else self.orbit_sign.to(device=device, dtype=dtype)
            self._device_cache[key] = (buckets, self.orbit_of.to(device), numels, sign)
        return self._device_cache[key]


@functools.lru_cache(maxsize=64)
def _cached_multi_table(key: Tuple[Tuple[Tuple[int, ...], str, str, str], ...]) -> MultiTable:
    return _from_tables(tuple(orbit_table(shape, group, in_rep, out_rep) for shape, group, in_rep, out_rep in key))


@functools.lru_cache(maxsize=64)
def _from_tables(tables: Tuple[OrbitTable, ...]) -> MultiTable:
    numels = tuple(int(torch.Size(t.shape).numel()) for t in tables)
    starts = (0,) + tuple(itertools.accumulate(numels))[:-1]
    return MultiTable(tables, numels, starts)


def multi_table(shapes_and_specs: Sequence[Tuple[Tuple[int, ...], str, str, str]]) -> MultiTable:
    """The concatenated table for layers given as (shape, group name, in_rep, out_rep), validated."""
    key = tuple((tuple(int(s) for s in shape), group, in_rep, out_rep)
                for shape, group, in_rep, out_rep in shapes_and_specs)
    for shape, group, in_rep, out_rep in key:
        orbit_table(shape, group, in_rep, out_rep)  # raises the per-argument errors of the public API
    return _cached_multi_table(key)
