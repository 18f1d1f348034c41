"""Distributed models: DistributedDataParallel wrappers and FSDP2 (DTensor) shards.

DDP keeps a full copy of every weight on every rank, so the penalty of the wrapped ``.module`` is
already the global value: it is computed locally, with no collective, and DDP's averaging of the
(identical) penalty gradients over ranks leaves them as they are.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as a DTensor sharded along a
dim (dim 0 by default) over a 1-D device mesh, or under HSDP over the shard dim of a 2-D mesh
(``Replicate() x Shard(0)``: every replica holds the same shards).  The orbits of a weight never
leave one (out-field, in-field) block, so a shard that holds whole output fields (dim 0) or whole
input fields (dim 1) has a penalty of its own, and the global penalty is the sum over ranks of the
local ones: each rank computes its part on its local shard (no weight is gathered) and one
all-reduce of one scalar per call adds them (``sum_over_ranks``) over the shard dim's group
(``process_group``).  Meshes are compared by that group's layout, not as objects: torch's recipe
without ``mesh=`` builds a new default mesh at every ``fully_shard`` call, all over the same ranks.
A shard that would cut through a field is refused with the recipe to avoid it (``local_shard``);
torch.chunk's uneven split (what FSDP2 pads) and empty shards are handled.

Gradients.  The penalty's gradient reaches the sharded parameters directly, beside FSDP2's
reduce-scatter, which turns the ranks' task gradients into ``sum_r g_r / D`` (D, the gradient divide
factor, is the world size by default: the average).  Every rank's loss holds the same global
penalty, so the objective FSDP2 differentiates is ``(1 / D) sum_r loss_r``, whose gradient through
the penalty on a rank's own shard is ``(world / D) dP / dW_local`` (world: every rank of the mesh,
HSDP's replicas included, as in FSDP2's default D).  The all-reduce's backward is therefore the
identity times ``world / D`` (1 by default), with no collective: exactly the gradient of the
single-process penalty.  (``torch.distributed.nn.functional.all_reduce`` would all-reduce the
gradient as well and give ``world`` times that.)  This assumes what the value already needs: every
rank adds the penalty to its loss with the same coefficient.
"""
from __future__ import annotations

import sys
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .symmetry import kind_of

__all__ = ["unwrap", "is_dtensor", "local_shard", "shard_mesh_dim", "process_group", "sum_over_ranks",
           "fsdp_params", "grad_scale", "single_weight_error", "LayerParams", "layer_params", "sharded_layers"]


def _loaded(module: str, name: str):
    """``module.name`` if that torch module is already imported, else None.  Importing
    torch.distributed.tensor / .fsdp costs most of a second; a process that has not imported them
    has no DTensor and no FSDP2 module, so projkernels never imports them itself."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers (nested ones too)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def is_dtensor(t) -> bool:
    cls = _loaded("torch.distributed.tensor", "DTensor")
    return cls is not None and isinstance(t, cls)


def _chunk_range(n: int, world: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of rank's rows under torch.chunk's split (FSDP2's, padding the last ranks)."""
    c = -(-n // world)
    start = min(rank * c, n)
    return start, min(start + c, n)


def shard_mesh_dim(t: torch.Tensor, label: str) -> int:
    """The mesh dim along which the DTensor ``t`` is sharded: its one ``Shard`` placement, every
    other mesh dim replicating it.  That is FSDP2's layout: ``(Shard(d),)`` on a 1-D mesh,
    ``(Replicate(), Shard(d))`` on HSDP's 2-D mesh."""
    shard, replicate = (_loaded("torch.distributed.tensor", n) for n in ("Shard", "Replicate"))
    # type(...) is Shard, not isinstance: a strided shard (FSDP2 over tensor parallelism) does not
    # hold one contiguous chunk of rows.
    dims = [i for i, p in enumerate(t.placements) if type(p) is shard]
    if len(dims) != 1 or not all(i == dims[0] or isinstance(p, replicate) for i, p in enumerate(t.placements)):
        raise NotImplementedError(
            f"{label}: a DTensor with placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh; the "
            "penalty supports parameters sharded along one mesh dim and replicated along the others: FSDP2's "
            "fully_shard on a 1-D mesh (Shard(0) by default) or on a 2-D mesh (HSDP, Replicate() x Shard(0)); "
            "replicated-only DTensors and tensor-parallel placements are not supported")
    return dims[0]


def local_shard(t: torch.Tensor, field_sizes: Sequence[int], label: str) -> Optional[torch.Tensor]:
    """The local part of a DTensor parameter ``t`` (a differentiable view, gradients land in the
    shard), checked to hold whole fields; None when this rank holds none of it.

    ``field_sizes[d]`` is the field size along dim d (output fields for dim 0, input fields for
    dim 1); a tensor may be sharded only along those dims, at multiples of the field size.
    """
    mesh = t.device_mesh
    mesh_dim = shard_mesh_dim(t, label)
    dim = t.placements[mesh_dim].dim
    n = t.shape[dim]
    # Under HSDP the rows are split over the shard dim only; the replicas along the other dims hold
    # the same shard.
    world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    start, stop = _chunk_range(n, world, rank)
    local = t.to_local()
    if local.shape[dim] != stop - start:
        raise NotImplementedError(f"{label}: the local shard has {local.shape[dim]} entries along dim {dim}, "
                                  f"expected {stop - start} (torch.chunk's split of {n} over {world} ranks); "
                                  "only that split (FSDP2's) is supported")
    size = field_sizes[dim] if dim < len(field_sizes) else None
    if size is None or start % size or stop % size:
        what = {0: "output", 1: "input"}.get(dim)
        if what is None or size is None:
            raise ValueError(f"{label}: sharded along dim {dim}; the orbits of the penalty move entries "
                             "along the kernel dims, so only dim 0 (output fields) or dim 1 (input fields) "
                             "may be sharded")
        c = -(-n // world)
        over = f"{world} ranks" if mesh.ndim == 1 else f"the {world} ranks of the shard dim of its {mesh.ndim}-D mesh"
        raise ValueError(
            f"{label}: FSDP2 splits dim {dim} ({n} {what} channels, {n // size} fields of {size}) over {over} "
            f"in chunks of ceil({n}/{world}) = {c} rows, which cuts through the {what} fields of size "
            f"{size} (rank {rank} holds [{start}, {stop})). The penalty's orbits stay inside a field, so every "
            f"shard must hold whole fields: make ceil({what} channels / world size) a multiple of {size}, for "
            f"example with a number of {what} fields that is a multiple of the world size"
            + (" (here the shard dim's size)" if mesh.ndim > 1 else "")
            + ("; or, for a layer with regular input fields and no regular-field bias, shard its weight along "
               "dim 1 instead (fully_shard(layer, shard_placement_fn=lambda p: Shard(1) if p is layer.weight "
               "else None)), which must then split into whole input fields" if dim == 0 else ""))
    return local if local.shape[dim] > 0 else None


def fsdp_params(model: nn.Module) -> dict:
    """``{(id(module), param name): (FSDPParam, its param group)}`` for every parameter that FSDP2
    manages in ``model``: the sharded parameter is read from there, so that a module whose
    parameters FSDP2 has swapped to their unsharded form (the root after its forward) is still
    penalised on its shard.  Empty for a model without FSDP2."""
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None:
        return {}
    out = {}
    for m in model.modules():
        if not isinstance(m, fsdp_module):
            continue
        state = m._get_fsdp_state()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            for p in group.fsdp_params:
                info = p._module_info
                out[(id(info.module), info.param_name)] = (p, group)
                for sm, sn in zip(info.shared_modules, info.shared_param_names):
                    out[(id(sm), sn)] = (p, group)
    return out


def grad_scale(group, world: int) -> float:
    """``world / D`` for an FSDP2 param group (D its gradient divide factor; the world size when
    unset, also under force-sum reduction), 1 for a DTensor that FSDP2 does not manage (group None)."""
    if group is None:
        return 1.0
    factor = getattr(group, "gradient_divide_factor", None)
    return 1.0 if factor is None else world / float(factor)


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group`` (in place, returned).  A CPU tensor under an NCCL-only
    group (FSDP2's CPU offload keeps the shards on the CPU) travels through the current GPU."""
    import torch.distributed as dist
    if t.device.type == "cpu" and "gloo" not in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, group=group)
        return t.copy_(on_gpu)
    dist.all_reduce(t, group=group)
    return t


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce (sum) of a scalar.  Backward: the identity times ``scale``, no
    collective (the module docstring derives why)."""

    @staticmethod
    def forward(ctx, local, group, scale):
        ctx.scale = scale
        return all_reduce(local.detach().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale if ctx.scale != 1.0 else grad, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``scale``: per-tensor scales when FSDP2 param groups carry
    different divide factors."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def sum_over_ranks(local: torch.Tensor, group, scale: float = 1.0) -> torch.Tensor:
    """The sum over the ranks of ``group`` of every rank's scalar ``local`` (one all-reduce),
    differentiable: the gradient reaching ``local`` is ``scale`` times the incoming one."""
    return _SumOverRanks.apply(local, group, scale)


# DeviceMesh -> {mesh dim: _shard_groups' key}.  ``mesh.mesh`` is rebuilt from the mesh's layout at
# every access (about half a millisecond), too slow for every penalty call of a model with a mesh per
# block.  A DeviceMesh hashes and compares by value, so equal meshes share an entry (same key).
_SHARD_GROUPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _shard_groups(mesh, mesh_dim: int) -> tuple:
    """What the penalty's sum over the ranks depends on, for a DTensor sharded along ``mesh_dim`` of
    ``mesh``: the mesh's device type and its ranks grouped as that dim groups them (one group per
    replica).  Two meshes that agree on it are the same for the penalty whatever their Python
    objects and dim names (``fully_shard`` without ``mesh=`` builds a new default mesh at every call)."""
    try:
        per_dim = _SHARD_GROUPS.setdefault(mesh, {})
    except TypeError:  # a mesh that cannot be weakly referenced: no cache
        per_dim = {}
    key = per_dim.get(mesh_dim)
    if key is None:
        layout = mesh.mesh
        ranks = layout.movedim(mesh_dim, -1).reshape(-1, layout.shape[mesh_dim])
        key = per_dim[mesh_dim] = (mesh.device_type, tuple(sorted(tuple(g) for g in ranks.tolist())))
    return key


def process_group(tensors: List[torch.Tensor], label: str = "model"):
    """The process group over which the penalty sums the local parts of the DTensors ``tensors``:
    the shard dim of their mesh (the whole 1-D mesh under FSDP2, the shard dim of HSDP's 2-D mesh,
    whose replicas hold the same shards).  Their meshes must agree on the ranks' shard groups
    (``_shard_groups``); every rank sees the same meshes, so every rank gets the same answer."""
    keys = {}   # (id(mesh), mesh dim) -> key: each mesh's layout is read once
    found = {}  # key -> [first mesh with it, its shard mesh dim, number of tensors]
    for t in tensors:
        mesh, dim = t.device_mesh, shard_mesh_dim(t, label)
        key = keys.get((id(mesh), dim))
        if key is None:
            key = keys[(id(mesh), dim)] = _shard_groups(mesh, dim)
        found.setdefault(key, [mesh, dim, 0])[2] += 1
    if len(found) != 1:
        where = "; ".join(f"{n} on a {dev} mesh of ranks {m.mesh.tolist()} sharded along mesh dim {d} (shard "
                          f"groups {list(groups)})" for (dev, groups), (m, d, n) in found.items())
        raise ValueError(
            f"{label}: its sharded parameters live on device meshes that split the ranks differently: {where}. "
            "The penalty sums the ranks' parts with one all-reduce over one set of shard groups: shard every "
            "module over the same ranks, with the same mesh in every fully_shard call (mesh=...), or with none "
            "(each call then builds the default mesh over all ranks)")
    mesh, dim, _ = next(iter(found.values()))
    return mesh.get_group(dim)


def single_weight_error(fn: str) -> TypeError:
    return TypeError(
        f"weight: {fn} got a DTensor (a sharded parameter); the single-weight functions take a full "
        "tensor. For a sharded model use model_penalty(model), project_(model), equivariance_report(model) "
        "or equivariance_decay(optimizer, model), which work on the local shards with one all-reduce; for "
        "one parameter, full_tensor() gathers it")


# --- whole models ---------------------------------------------------------------------------

class LayerParams:
    """One attached layer's parameters: the one description of a layer that the whole-model
    functions and the decay read.  Where its weight and bias are read (FSDP2's sharded parameter when
    FSDP2 manages it, else the module attribute), their local shards on this rank (the tensors
    themselves when they are not DTensors) and the gradient scales of FSDP2's reduction."""
    __slots__ = ("name", "module", "sym", "weight_src", "bias_src", "_fields")

    def __init__(self, name, module, sym, fsdp: Optional[dict] = None):
        fsdp = fsdp or {}
        self.name, self.module, self.sym = name or "(model)", module, sym
        self.weight_src = fsdp.get((id(module), "weight"))
        self.bias_src = fsdp.get((id(module), "bias"))
        self._fields = None

    @property
    def fields(self):
        """(field_out, field_in): the field sizes a shard must keep whole (finite groups only)."""
        if self._fields is None:
            from .groups import get_group
            from .orbits import field_size
            g = get_group(self.sym.group)
            self._fields = (field_size(self.sym.out_rep, g), field_size(self.sym.in_rep, g))
        return self._fields

    def weight(self) -> torch.Tensor:
        return self.weight_src[0].sharded_param if self.weight_src is not None else self.module.weight

    def bias(self) -> Optional[torch.Tensor]:
        if self.module.bias is None:
            return None
        return self.bias_src[0].sharded_param if self.bias_src is not None else self.module.bias

    def weight_scale(self) -> float:
        return _scale_of(self.weight_src, self.weight())

    def bias_scale(self) -> float:
        return _scale_of(self.bias_src, self.bias())

    def local_weight(self):
        """(tensor or None, sharded): the local shard of a DTensor weight (None where it is empty),
        else the weight itself."""
        w = self.weight()
        if is_dtensor(w):
            return local_shard(w, self.fields, f"layer {self.name!r} weight"), True
        return w, False

    def local_bias(self):
        """(tensor or None, sharded), as ``local_weight``; the bias's fields are the output fields."""
        b = self.bias()
        if is_dtensor(b):
            return local_shard(b, self.fields[:1], f"layer {self.name!r} bias"), True
        return b, False


def _scale_of(src, t) -> float:
    if src is None or not is_dtensor(t):
        return 1.0
    return grad_scale(src[1], t.device_mesh.size())


def layer_params(model: nn.Module, layers) -> Tuple[List[LayerParams], bool]:
    """``LayerParams`` of the attached ``layers`` (name, module, symmetry), and whether the model
    has sharded parameters (a DTensor weight or bias, or one that FSDP2 manages); a sharded model
    must have finite groups on every attached layer."""
    fsdp = fsdp_params(model)
    sharded = any((id(m), "weight") in fsdp or (id(m), "bias") in fsdp or is_dtensor(m.weight)
                  or is_dtensor(getattr(m, "bias", None)) for _, m, _ in layers)
    if sharded:
        for name, _, sym in layers:
            if not kind_of(sym.group).shardable:
                raise NotImplementedError(f"layer {name!r}: a {type(sym.group).__name__} on a sharded (DTensor / "
                                          "FSDP2) model is not supported; the sharded penalty serves finite groups")
    return [LayerParams(n, m, s, fsdp) for n, m, s in layers], sharded


def sharded_layers(model: nn.Module, layers) -> Optional[List[LayerParams]]:
    """``LayerParams`` of the attached ``layers`` when the model has sharded parameters; None
    for a model without them (the whole-model functions then take their fused routes)."""
    params, sharded = layer_params(model, layers)
    return params if sharded else None


def layer_type_name(module: nn.Module) -> str:
    """The layer's class name, without FSDP2's dynamic wrapper class (``FSDPLinear`` -> ``Linear``)."""
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is None:
        return type(module).__name__
    return next(c for c in type(module).__mro__ if not issubclass(c, fsdp_module)).__name__


def reshard(model: nn.Module) -> None:
    """``reshard()`` every FSDP2 module of ``model`` (frees unsharded copies; a no-op when sharded)."""
    fsdp_module = _loaded("torch.distributed.fsdp", "FSDPModule")
    if fsdp_module is not None:
        for m in model.modules():
            if isinstance(m, fsdp_module):
                m.reshard()
