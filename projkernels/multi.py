"""The penalty of a whole model in one pass: every layer's weight through one concatenated buffer.

A model has tens of weights; calling ``penalty_and_energy`` per weight costs tens of small launches
and tens of autograd nodes per step.  Here the flattened weights are concatenated once, and one
``MultiTable`` (built once per list of (shape, group, reps), then cached) describes all their orbits
against that buffer.  Layers whose groups have the same order share one gather (the orbit width is
|G|), so the work is one gather per distinct |G| and one segment reduction that turns per-orbit
partials into per-layer values, however many layers there are.

The seam for a fused multi-tensor kernel is ``register_multi_backend``: a backend supplies
``forward(buffer, table) -> (per_layer_penalty, per_layer_eq)`` and
``backward(buffer, table, grad_penalty[L], grad_eq[L]) -> grad_buffer`` over the concatenated
buffer and table, exactly as the reference route below does.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .backends import BACKENDS, check_backend_name, resolve
from .groups import FiniteGroup, get_group, register_group
from .orbits import OrbitTable, check_weight, orbit_table
from .reference import acc_dtype

__all__ = ["multi_penalty", "MultiTable", "multi_table", "register_multi_backend"]


# --- the concatenated table --------------------------------------------------------------------

@dataclass(frozen=True)
class OrderBucket:
    """All orbits of the layers whose group has order ``order``, as rows of one gather."""
    order: int
    index: torch.Tensor      # [n_orbits, order] int64 flat indices into the concatenated buffer
    inv_stab: torch.Tensor   # [n_orbits] float64, 1/|Stab|
    layer: torch.Tensor      # [n_orbits] int64, the layer each orbit belongs to


@dataclass(frozen=True, eq=False)
class MultiTable:
    tables: Tuple[OrbitTable, ...]      # one per layer, in the caller's order
    numels: Tuple[int, ...]
    starts: Tuple[int, ...]             # where each layer begins in the buffer
    buckets: Tuple[OrderBucket, ...]
    _device_cache: Dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.tables)

    @property
    def numel(self) -> int:
        return self.starts[-1] + self.numels[-1] if self.tables else 0

    def on(self, device: torch.device, dtype: torch.dtype) -> Tuple[OrderBucket, ...]:
        """Buckets with index / layer on ``device`` and inv_stab in ``dtype``, cached."""
        key = (str(device), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = tuple(
                OrderBucket(b.order, b.index.to(device), b.inv_stab.to(device=device, dtype=dtype),
                            b.layer.to(device)) for b in self.buckets)
        return self._device_cache[key]


@functools.lru_cache(maxsize=64)
def _cached_multi_table(key: Tuple[Tuple[Tuple[int, ...], str, str, str], ...]) -> MultiTable:
    tables = tuple(orbit_table(shape, group, in_rep, out_rep) for shape, group, in_rep, out_rep in key)
    numels, starts, pos = [], [], 0
    for t in tables:
        n = 1
        for s in t.shape:
            n *= s
        starts.append(pos)
        numels.append(n)
        pos += n
    by_order: Dict[int, List[int]] = {}
    for i, t in enumerate(tables):
        by_order.setdefault(t.group.order, []).append(i)
    buckets = []
    for order, layers in sorted(by_order.items()):
        index = torch.cat([tables[i].gather_index + starts[i] for i in layers])
        inv_stab = torch.cat([tables[i].inv_stab.repeat(tables[i].n_blocks) for i in layers])
        layer = torch.cat([torch.full((tables[i].n_orbits,), i, dtype=torch.int64) for i in layers])
        buckets.append(OrderBucket(order, index.contiguous(), inv_stab, layer))
    return MultiTable(tables, tuple(numels), tuple(starts), tuple(buckets))


def multi_table(shapes_and_specs: Sequence[Tuple[Tuple[int, ...], str, str, str]]) -> MultiTable:
    """The concatenated table for layers given as (shape, group name, in_rep, out_rep), validated."""
    key = tuple((tuple(int(s) for s in shape), group, in_rep, out_rep)
                for shape, group, in_rep, out_rep in shapes_and_specs)
    for shape, group, in_rep, out_rep in key:
        orbit_table(shape, group, in_rep, out_rep)  # raises the per-argument errors of SPEC section 5
    return _cached_multi_table(key)


# --- the reference route over the concatenated buffer ------------------------------------------

def reference_multi_forward(buffer: torch.Tensor, table: MultiTable) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (penalty, eq_energy) in the accumulation dtype, penalty from deviations."""
    acc = acc_dtype(buffer.dtype)
    sums = torch.zeros(table.n_layers, 2, dtype=acc, device=buffer.device)
    for b in table.on(buffer.device, acc):
        f = buffer[b.index].to(acc)
        mean = f.mean(dim=1, keepdim=True)
        part = torch.stack(((f - mean).square().sum(dim=1), b.order * mean.squeeze(1).square()), dim=1)
        sums.index_add_(0, b.layer, part * b.inv_stab[:, None])
    return sums[:, 0], sums[:, 1]


def reference_multi_backward(buffer: torch.Tensor, table: MultiTable, grad_penalty: torch.Tensor,
                             grad_eq: torch.Tensor) -> torch.Tensor:
    """2 gp_l (W - P W) + 2 ge_l P W for every layer l, over the buffer, in the accumulation dtype.

    Written orbit by orbit from the deviations f - mean, so a nearly equivariant weight keeps its
    small gradient exactly as the single-layer route does.  Every entry lies in exactly one orbit,
    and repeated entries of an orbit row (|Stab| > 1) receive the same value, so the scatter fills
    the whole buffer unambiguously.
    """
    acc = acc_dtype(buffer.dtype)
    gp, ge = 2 * grad_penalty.to(acc), 2 * grad_eq.to(acc)
    out = torch.empty(buffer.shape, dtype=acc, device=buffer.device)
    for b in table.on(buffer.device, acc):
        f = buffer[b.index].to(acc)
        mean = f.mean(dim=1, keepdim=True)
        vals = gp[b.layer, None] * (f - mean) + ge[b.layer, None] * mean
        out[b.index.reshape(-1)] = vals.reshape(-1)
    return out


@dataclass(frozen=True)
class MultiBackend:
    name: str
    forward: Callable
    backward: Callable
    unavailable: Callable[[torch.device], Optional[str]]


MULTI_BACKENDS: Dict[str, MultiBackend] = {}
# A fused multi-tensor kernel registered under a device type is what "auto" picks for that device.
_MULTI_AUTO = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}


def register_multi_backend(backend: MultiBackend) -> None:
    MULTI_BACKENDS[backend.name] = backend


register_multi_backend(MultiBackend("reference", reference_multi_forward, reference_multi_backward,
                                    lambda device: None))


def _per_layer(name: str) -> MultiBackend:
    """A single-layer backend applied layer by layer to views of the buffer.

    Used when an explicit backend has a single-weight kernel but no multi-tensor one: results are
    the same, only the launch count grows with the number of layers.
    """
    single = BACKENDS[name]

    def views(buffer, table):
        return [buffer[s:s + n].view(t.shape) for s, n, t in zip(table.starts, table.numels, table.tables)]

    def forward(buffer, table):
        pairs = [single.forward(w, t) for w, t in zip(views(buffer, table), table.tables)]
        return torch.stack([p for p, _ in pairs]), torch.stack([e for _, e in pairs])

    def backward(buffer, table, grad_penalty, grad_eq):
        acc = acc_dtype(buffer.dtype)
        parts = [single.backward(w, t, grad_penalty[i].to(acc), grad_eq[i].to(acc)).reshape(-1).to(acc)
                 for i, (w, t) in enumerate(zip(views(buffer, table), table.tables))]
        return torch.cat(parts)

    return MultiBackend(name + "/per-layer", forward, backward, single.unavailable)


def _resolve_multi(backend: str, device: torch.device) -> MultiBackend:
    check_backend_name(backend)
    if backend == "auto":
        for name in _MULTI_AUTO.get(device.type, ()):
            mb = MULTI_BACKENDS.get(name)
            if mb is not None and mb.unavailable(device) is None:
                return mb
        return MULTI_BACKENDS["reference"]
    single = resolve(backend, device)  # clear RuntimeError when the backend cannot serve this device
    mb = MULTI_BACKENDS.get(backend)
    if mb is not None and mb.unavailable(device) is None:
        return mb
    return _per_layer(single.name)


# --- autograd ----------------------------------------------------------------------------------

class _MultiPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: MultiTable, impl: MultiBackend, buf_dtype: torch.dtype, *weights):
        buffer = torch.cat([w.detach().reshape(-1).to(buf_dtype) for w in weights])
        pen, eq = impl.forward(buffer, table)
        ctx.save_for_backward(buffer)
        ctx.table, ctx.impl = table, impl
        ctx.weight_meta = [(w.dtype, w.shape) for w in weights]
        return pen.sum(), eq.sum(), pen, eq

    @staticmethod
    def backward(ctx, g_total_pen, g_total_eq, g_pen, g_eq):
        (buffer,) = ctx.saved_tensors
        table = ctx.table
        acc = acc_dtype(buffer.dtype)
        dev = buffer.device

        def per_layer(total, vec):
            out = torch.zeros(table.n_layers, dtype=acc, device=dev)
            if total is not None:
                out = out + total.to(acc)
            if vec is not None:
                out = out + vec.to(acc)
            return out

        gp, ge = per_layer(g_total_pen, g_pen), per_layer(g_total_eq, g_eq)
        grad = ctx.impl.backward(buffer, table, gp, ge)
        grads = [None] * len(ctx.weight_meta)
        for i, ((dtype, shape), s, n) in enumerate(zip(ctx.weight_meta, table.starts, table.numels)):
            if ctx.needs_input_grad[3 + i]:
                grads[i] = grad[s:s + n].view(shape).to(dtype)
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
    if isinstance(group, FiniteGroup):
        if get_group(group.name) is not group:
            register_group(group)
        return group.name
    if not isinstance(group, str):
        raise TypeError(f"items[{i}]: group: expected a name like 'C4' or 'D4' (str), got {type(group).__name__}")
    return group


def multi_penalty(items, *, backend: str = "auto"):
    """Penalty and equivariant energy of many weights in one pass.

    ``items``: a sequence of ``(weight, group, in_rep, out_rep)`` tuples, or of objects with
    attributes ``weight``, ``group``, ``in_rep`` and ``out_rep``.  Returns
    ``(total_penalty, total_eq_energy, per_layer_penalty [L], per_layer_eq [L])``, all
    differentiable with respect to every weight (gradient 2 (W - P W) and 2 P W per layer).

    The weights are concatenated into one buffer of their promoted dtype; accumulation is float64
    when that is float64 and float32 otherwise, and the results have the accumulation dtype.  All
    weights must live on one device.  ``backend="auto"`` uses a fused multi-tensor kernel where one
    is registered for the device and the concatenated reference route otherwise; an explicit
    compiled backend without a multi-tensor kernel is applied layer by layer.
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
