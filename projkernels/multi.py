"""The penalty of a whole model in one call: every layer's weight, one pass per direction.

A model has tens of weights; calling ``penalty_and_energy`` per weight costs tens of small launches
and tens of autograd nodes per step.  ``multi_penalty`` takes them all at once through a
``MultiTable`` (the layers' orbit tables, built once per list of (shape, group, reps), then cached)
and a multi-tensor backend:

- "cpp" and "cuda" (registered by ``projkernels.cpp_backend`` when the extension is built): fused
  multi-tensor kernels over a table of per-layer descriptors; one launch per direction per dtype
  on the GPU, one parallel pass on the CPU, no concatenation of the weights.
- "reference": the flattened weights are concatenated once; layers whose groups have the same
  order share one gather (the orbit width is |G|), and one segment reduction turns per-orbit
  partials into per-layer values, however many layers there are.
- any other single-weight backend (for example "triton") is applied layer by layer.

``register_multi_backend`` is the seam: a backend supplies ``forward(x, table) -> (per_layer_penalty,
per_layer_eq)`` and ``backward(x, table, grad_penalty[L], grad_eq[L]) -> dx``, over the concatenated
buffer (``concatenated=True``) or the list of contiguous weights.  ``backend="auto"`` prefers a fused
multi-tensor kernel for the device, then the device's compiled single-weight backend layer by layer,
then the concatenated reference route.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .backends import BACKENDS, check_backend_name, resolve
from .groups import group_name_for_ops
from .orbits import OrbitTable, check_weight, orbit_table
from .reference import acc_dtype

__all__ = ["multi_penalty", "MultiTable", "multi_table", "register_multi_backend"]


# --- the concatenated table --------------------------------------------------------------------

@dataclass(frozen=True)
class OrderBucket:
    """All orbits of the layers whose group has order ``order``, as rows of one gather."""
    order: int
    index: torch.Tensor      # [n_orbits, order] flat indices into the concatenated buffer
    inv_stab: torch.Tensor   # [n_orbits] float64, 1/|Stab|
    layer: torch.Tensor      # [n_orbits] int64, the layer each orbit belongs to


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
        for order, layers in sorted(by_order.items()):
            t = [self.tables[i] for i in layers]
            index = torch.cat([(x.block_bases()[:, None, None] + x.offsets[None] + self.starts[i]).reshape(-1, order)
                               for i, x in zip(layers, t)]).to(itype)
            inv_stab = torch.cat([x.inv_stab.repeat(x.n_blocks) for x in t])
            layer = torch.cat([torch.full((x.n_orbits,), i, dtype=torch.int64) for i, x in zip(layers, t)])
            ids = torch.arange(first, first + index.shape[0], dtype=itype)
            orbit_of[index.reshape(-1)] = ids.repeat_interleave(order)
            first += index.shape[0]
            buckets.append(OrderBucket(order, index.contiguous(), inv_stab, layer))
        return tuple(buckets), orbit_of

    @property
    def buckets(self) -> Tuple[OrderBucket, ...]:
        """One gather per distinct group order; orbits numbered bucket after bucket."""
        return self._concatenated[0]

    @property
    def orbit_of(self) -> torch.Tensor:
        """[numel] the orbit of each buffer entry, so that P W = orbit_means[orbit_of]."""
        return self._concatenated[1]

    def on(self, device: torch.device, dtype: torch.dtype):
        """(buckets, orbit_of, numels) with indices on ``device`` and inv_stab in ``dtype``, cached."""
        key = (str(device), dtype)
        if key not in self._device_cache:
            buckets = tuple(OrderBucket(b.order, b.index.to(device), b.inv_stab.to(device=device, dtype=dtype),
                                        b.layer.to(device)) for b in self.buckets)
            numels = torch.tensor(self.numels, dtype=torch.int64, device=device)
            self._device_cache[key] = (buckets, self.orbit_of.to(device), numels)
        return self._device_cache[key]


@functools.lru_cache(maxsize=64)
def _cached_multi_table(key: Tuple[Tuple[Tuple[int, ...], str, str, str], ...]) -> MultiTable:
    tables = tuple(orbit_table(shape, group, in_rep, out_rep) for shape, group, in_rep, out_rep in key)
    numels = tuple(int(torch.Size(t.shape).numel()) for t in tables)
    starts = (0,) + tuple(itertools.accumulate(numels))[:-1]
    return MultiTable(tables, numels, starts)


def multi_table(shapes_and_specs: Sequence[Tuple[Tuple[int, ...], str, str, str]]) -> MultiTable:
    """The concatenated table for layers given as (shape, group name, in_rep, out_rep), validated."""
    key = tuple((tuple(int(s) for s in shape), group, in_rep, out_rep)
                for shape, group, in_rep, out_rep in shapes_and_specs)
    for shape, group, in_rep, out_rep in key:
        orbit_table(shape, group, in_rep, out_rep)  # raises the per-argument errors of SPEC section 5
    return _cached_multi_table(key)


# --- the reference route over the concatenated buffer ------------------------------------------

def _orbit_rows(buffer: torch.Tensor, bucket: OrderBucket, acc: torch.dtype) -> torch.Tensor:
    return buffer.index_select(0, bucket.index.reshape(-1)).view(-1, bucket.order).to(acc)


def reference_multi_forward(buffer: torch.Tensor, table: MultiTable) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (penalty, eq_energy) in the accumulation dtype, penalty from deviations."""
    acc = acc_dtype(buffer.dtype)
    sums = torch.zeros(table.n_layers, 2, dtype=acc, device=buffer.device)
    for b in table.on(buffer.device, acc)[0]:
        f = _orbit_rows(buffer, b, acc)
        mean = f.mean(dim=1, keepdim=True)
        part = torch.stack(((f - mean).square().sum(dim=1), b.order * mean.squeeze(1).square()), dim=1)
        sums.index_add_(0, b.layer, part * b.inv_stab[:, None])
    return sums[:, 0], sums[:, 1]


def reference_multi_backward(buffer: torch.Tensor, table: MultiTable, grad_penalty: torch.Tensor,
                             grad_eq: torch.Tensor) -> torch.Tensor:
    """2 gp_l (W - P W) + 2 ge_l P W for every layer l, over the buffer, in the accumulation dtype.

    P W is the orbit means read back through ``orbit_of`` (a gather, not a scatter), and the
    penalty part is taken from the deviations W - P W entry by entry, as the single-layer route does.
    """
    acc = acc_dtype(buffer.dtype)
    buckets, orbit_of, numels = table.on(buffer.device, acc)
    means = torch.cat([_orbit_rows(buffer, b, acc).mean(dim=1) for b in buckets])
    pw = means.index_select(0, orbit_of)
    n = buffer.numel()
    gp = torch.repeat_interleave(2 * grad_penalty.to(acc), numels, output_size=n)
    ge = torch.repeat_interleave(2 * grad_eq.to(acc), numels, output_size=n)
    return gp * (buffer.to(acc) - pw) + ge * pw


@dataclass(frozen=True)
class MultiBackend:
    """``forward(x, table) -> (per_layer_penalty [L], per_layer_eq [L])`` and
    ``backward(x, table, grad_penalty [L], grad_eq [L]) -> dx``.  With ``concatenated=True`` x is
    the concatenated buffer and dx a buffer in the accumulation dtype (the fused-kernel seam);
    otherwise x is the list of contiguous weights and dx the list of their gradients."""
    name: str
    forward: Callable
    backward: Callable
    unavailable: Callable[[torch.device], Optional[str]]
    concatenated: bool = True


MULTI_BACKENDS: Dict[str, MultiBackend] = {}
# Preference per device type for backend="auto": a fused multi-tensor kernel registered under one of
# these names first, then the same names' single-weight kernels layer by layer, then the reference.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}


def register_multi_backend(backend: MultiBackend) -> None:
    MULTI_BACKENDS[backend.name] = backend


register_multi_backend(MultiBackend("reference", reference_multi_forward, reference_multi_backward,
                                    lambda device: None))


@functools.lru_cache(maxsize=None)
def _per_layer(name: str) -> MultiBackend:
    """A single-weight backend applied weight by weight (no concatenation).

    For a backend with a single-weight kernel but no multi-tensor one: launches grow with the
    number of layers, but each is a fused pass, which beats the gather-based reference route.
    """
    single = BACKENDS[name]

    def forward(weights, table):
        acc = functools.reduce(torch.promote_types, (acc_dtype(w.dtype) for w in weights))
        pairs = [single.forward(w, t) for w, t in zip(weights, table.tables)]
        return torch.stack([p.to(acc) for p, _ in pairs]), torch.stack([e.to(acc) for _, e in pairs])

    def backward(weights, table, grad_penalty, grad_eq):
        out = []
        for w, t, gp, ge in zip(weights, table.tables, grad_penalty.unbind(), grad_eq.unbind()):
            acc = acc_dtype(w.dtype)
            out.append(single.backward(w, t, gp.to(acc), ge.to(acc)))
        return out

    return MultiBackend(name + "/per-layer", forward, backward, single.unavailable, concatenated=False)


def _usable(name: str, device: torch.device) -> Optional[MultiBackend]:
    mb = MULTI_BACKENDS.get(name)
    if mb is not None and mb.unavailable(device) is None:
        return mb
    if name in BACKENDS and BACKENDS[name].unavailable(device) is None:
        return _per_layer(name)
    return None


def _resolve_multi(backend: str, device: torch.device) -> MultiBackend:
    check_backend_name(backend)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ()):
            mb = MULTI_BACKENDS.get(name)
            if mb is not None and mb.unavailable(device) is None:
                return mb
        for name in _AUTO_ORDER.get(device.type, ()):
            mb = _usable(name, device)
            if mb is not None:
                return mb
        return MULTI_BACKENDS["reference"]
    resolve(backend, device)  # the clear RuntimeError when this backend cannot serve the device
    return _usable(backend, device)


# --- autograd ----------------------------------------------------------------------------------

class _MultiPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: MultiTable, impl: MultiBackend, buf_dtype: torch.dtype, *weights):
        if impl.concatenated:
            x = torch.cat([w.detach().reshape(-1).to(buf_dtype) for w in weights])
            ctx.save_for_backward(x)
        else:
            x = [w.detach().contiguous() for w in weights]
            ctx.save_for_backward(*x)
        pen, eq = impl.forward(x, table)
        ctx.table, ctx.impl = table, impl
        ctx.weight_meta = [(w.dtype, w.shape) for w in weights]
        return pen.sum(), eq.sum(), pen, eq

    @staticmethod
    def backward(ctx, g_total_pen, g_total_eq, g_pen, g_eq):
        saved = ctx.saved_tensors
        table = ctx.table
        acc = functools.reduce(torch.promote_types, (acc_dtype(w.dtype) for w in saved))
        dev = saved[0].device

        def per_layer(total, vec):
            # Layer l's weight on this term: the total's gradient plus its own entry's.
            out = torch.zeros(table.n_layers, dtype=acc, device=dev)
            if total is not None:
                out = out + total.to(acc)
            if vec is not None:
                out = out + vec.to(acc)
            return out

        gp, ge = per_layer(g_total_pen, g_pen), per_layer(g_total_eq, g_eq)
        if ctx.impl.concatenated:
            grad = ctx.impl.backward(saved[0], table, gp, ge)
            parts = [grad[s:s + n] for s, n in zip(table.starts, table.numels)]
        else:
            parts = ctx.impl.backward(list(saved), table, gp, ge)
        grads = [None] * len(ctx.weight_meta)
        for i, ((dtype, shape), part) in enumerate(zip(ctx.weight_meta, parts)):
            if ctx.needs_input_grad[3 + i]:
                grads[i] = part.reshape(shape).to(dtype)
        return (None, None, None, *grads)


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


def _group_name(group, i: int) -> str:
    return group_name_for_ops(group, f"items[{i}]: group")


def multi_penalty(items, *, backend: str = "auto"):
    """Penalty and equivariant energy of many weights in one pass.

    ``items``: a sequence of ``(weight, group, in_rep, out_rep)`` tuples, or of objects with
    attributes ``weight``, ``group``, ``in_rep`` and ``out_rep``.  Returns
    ``(total_penalty, total_eq_energy, per_layer_penalty [L], per_layer_eq [L])``, all
    differentiable with respect to every weight (gradient 2 (W - P W) and 2 P W per layer).

    The weights are concatenated into one buffer of their promoted dtype; accumulation is float64
    when that is float64 and float32 otherwise, and the results have the accumulation dtype.  All
    weights must live on one device.  ``backend="auto"`` uses a fused multi-tensor kernel where one
    is registered for the device, else the device's compiled single-weight backend layer by layer,
    else the concatenated reference route; an explicit backend without a multi-tensor kernel is
    applied layer by layer.  ``backend="reference"`` is the concatenated route.
    """
    check_backend_name(backend)
    items = list(items)
    if not items:
        z = torch.zeros((), dtype=torch.float32)
        return z, z.clone(), torch.zeros(0), torch.zeros(0)
    weights, key = [], []
    for i, item in enumerate(items):
        weight, group, in_rep, out_rep = _unpack(item, i)
        try:
            check_weight(weight)
        except (TypeError, ValueError) as e:
            raise type(e)(f"items[{i}]: {e}") from None
        for name, rep in (("in_rep", in_rep), ("out_rep", out_rep)):
            if not isinstance(rep, str):
                raise TypeError(f"items[{i}]: {name}: expected 'trivial' or 'regular' (str), got {type(rep).__name__}")
        weights.append(weight)
        key.append((tuple(weight.shape), _group_name(group, i), in_rep, out_rep))
    device = weights[0].device
    for i, w in enumerate(weights):
        if w.device != device:
            raise ValueError(f"items[{i}]: weight is on {w.device}, but items[0] is on {device}; "
                             "all weights must be on one device")
    try:
        table = multi_table(key)
    except (TypeError, ValueError) as e:
        bad = next(i for i, k in enumerate(key) if _fails(k))
        raise type(e)(f"items[{bad}]: {e}") from None
    buf_dtype = functools.reduce(torch.promote_types, (w.dtype for w in weights))
    impl = _resolve_multi(backend, device)
    return _MultiPenalty.apply(table, impl, buf_dtype, *weights)


def _fails(key) -> bool:
    try:
        orbit_table(*key)
        return False
    except (TypeError, ValueError):
        return True
