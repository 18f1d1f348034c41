"""Equivariance decay: the projection penalty applied inside the optimizer step.

Adding ``lambda_perp ||W - P(W)||^2`` to the loss costs an autograd node per step, and with an
adaptive optimizer (Adam) the penalty's gradient is rescaled by the second-moment estimate like any
other gradient.  ``equivariance_decay`` instead updates every attached weight in the optimizer's
step pre-hook, as AdamW applies weight decay:

    mode="decoupled":  W <- W - lr (2 lambda_perp (W - P W) + 2 lambda_G P W)     (before the step)
    mode="coupled":    W.grad += 2 lambda_perp (W - P W) + 2 lambda_G P W         (before the step)

``lr`` is the parameter group's current learning rate (schedulers work).  For plain SGD both modes
give exactly the update of the penalty in the loss; for other optimizers "coupled" is still exactly
the penalty in the loss, and "decoupled" shrinks the non-equivariant part by the factor
``1 - 2 lr lambda_perp`` whatever the optimizer's preconditioning.  Regular-field biases join the
``lambda_perp`` term as in ``model_penalty`` (their deviation from the per-field mean);
``lambda_G`` acts on weights only.  Layers whose symmetry kind has no orbit table (steerable
symmetries, projkernels/symmetry/steerable.py) get the same update from their own projection (weights: the block projection, biases: each output
field's trivial-isotypic part), one layer at a time, computed in the accumulation dtype.

All attached finite-group tensors are updated by one in-place pass per step through the backend's
decay slot (projkernels/backends/registry.py): ``projkernels_C::multi_decay_`` and ``multi_decay_grad_``
on the compiled backends (one CPU parallel loop, or one CUDA launch, for all layers and dtypes), one
Triton kernel per tensor, or plain tensor code on the reference backend.  The
math is float32 for half-precision tensors (float64 for float64) and the result is deterministic.

Mixed precision.  ``torch.amp.GradScaler.step(optimizer)`` unscales the gradients (``unscale_``)
before it calls ``optimizer.step()``, and it skips the step (hooks included) when it finds inf/NaN,
so both modes see unscaled gradients and skipped steps are skipped for the decay too.  Optimizers
that unscale inside their own step (``fused=True``, ``_step_supports_amp_scaling``) get
``optimizer.grad_scale`` and ``optimizer.found_inf`` from the scaler instead: "coupled" then
multiplies its addition by ``grad_scale`` (the optimizer divides it out again) and "decoupled"
skips a step whose ``found_inf`` is set; both read that scalar on the host (one device sync per
step on a GPU).  A ``clip_grad_norm_`` between ``unscale_`` and ``step`` clips the task gradient
only: the coupled addition comes after it (unlike the penalty in the loss).
"""
from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import distributed as D
from .api import project
from .backends.registry import (BACKENDS, Backend, available_backends, check_backend_name, register_backend,
                                resolve)
from .dispatch.config import config_for
from .model import _check_lambda, attached_layers
from .orbits import OrbitTable, acc_dtype
from .symmetry import kind_of

__all__ = ["equivariance_decay", "EquivarianceDecay", "DecayBackend", "register_decay_backend",
           "decay_backends", "apply_decay_", "MODES"]

MODES = ("decoupled", "coupled")


# --- backends ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecayBackend:
    """A backend with only a decay slot, for ``register_decay_backend``: ``apply(targets, weights,
    tables, coef_dev, coef_mean)`` sets, for every l, ``targets[l] += coef_dev[l] (W_l - P W_l) +
    coef_mean[l] P W_l`` in place, with ``W_l = weights[l]`` (``weights=None``: the targets
    themselves).  Targets are contiguous; the tables are the layers' ``OrbitTable``s (a bias is
    described as an (n, 1) weight with regular output fields)."""
    name: str
    apply: Callable
    why_unavailable: Callable[[torch.device], Optional[str]]


def register_decay_backend(backend: DecayBackend) -> None:
    """Give backend ``backend.name`` a decay slot (registering a decay-only backend if it is new)."""
    from dataclasses import replace
    old = BACKENDS.get(backend.name)
    if old is None:
        old = Backend(backend.name, None, None, None, None, backend.why_unavailable)
    register_backend(replace(old, decay=backend.apply))


def decay_backends(device="cpu") -> List[str]:
    """Names of the backends whose decay slot serves tensors on ``device``, the "auto" order first."""
    return available_backends(device, "decay", auto_first=True)


@torch.no_grad()
def apply_decay_(targets: Sequence[torch.Tensor], weights: Optional[Sequence[torch.Tensor]],
                 tables: Sequence[OrbitTable], coef_dev: Sequence[float], coef_mean: Sequence[float], *,
                 backend: str = "auto") -> None:
    """``targets[l] += coef_dev[l] (W_l - P W_l) + coef_mean[l] P W_l`` in place for every l, one
    fused pass per device (``W_l = weights[l]``, or the targets themselves when ``weights`` is None).

    The low-level entry point of the decay (an optimizer-style update: no autograd); non-contiguous
    targets are updated through a copy."""
    check_backend_name(backend)
    targets = list(targets)
    if not targets:
        return
    n = len(targets)
    for name, seq in (("weights", weights), ("tables", tables), ("coef_dev", coef_dev), ("coef_mean", coef_mean)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name}: expected one entry per target ({n}), got {len(seq)}")
    by_device: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(targets):
        by_device.setdefault(t.device, []).append(i)
    for device, idx in by_device.items():
        impl = resolve(backend, device, "decay")
        ts = [targets[i] for i in idx]
        # An in-place kernel on a contiguous copy would update the copy: write such targets back.
        back = [(j, t) for j, t in enumerate(ts) if not t.is_contiguous()]
        for j, t in back:
            ts[j] = t.contiguous()
        ws = None if weights is None else [weights[i].contiguous() for i in idx]
        single = len(idx) == len(targets)
        impl.decay(ts, ws, tables if single else [tables[i] for i in idx],
                   list(coef_dev) if single else [coef_dev[i] for i in idx],
                   list(coef_mean) if single else [coef_mean[i] for i in idx])
        for j, t in back:
            t.copy_(ts[j])


# --- the handle --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Entry:
    param: torch.Tensor
    table: Optional[OrbitTable]  # None: a DTensor whose shard on this rank is empty, or a steerable entry
    is_bias: bool
    name: str
    sharded: bool = False        # a DTensor: the update acts on its local shard (and its grad's)
    steerable: object = None     # a symmetry without orbit tables: updated through its projection
    steerable_backend: str = "auto"                  # ... computed by this backend

    @property
    def active(self) -> bool:
        return self.table is not None or self.steerable is not None


def _steerable_update_(target: torch.Tensor, weight: torch.Tensor, e: _Entry, coef_dev: float,
                       coef_mean: float) -> None:
    """``target += coef_dev (W - P W) + coef_mean P W`` for a steerable entry, in the accumulation
    dtype (P W of a half weight is computed from its float32 copy, not rounded to half first)."""
    acc = acc_dtype(weight.dtype)
    w = weight.to(acc)
    pw = (kind_of(e.steerable).project_bias(w, e.steerable, "trivial", e.name) if e.is_bias
          else project(w, e.steerable, backend=e.steerable_backend))
    old = w if target is weight else target.to(acc)
    target.copy_(old + (coef_dev * (w - pw) + coef_mean * pw))  # rounded once, as the fused kernels do


def _closure_given(args, kwargs) -> bool:
    # The step pre-hooks receive step's positional arguments with the optimizer itself first.
    return kwargs.get("closure") is not None or (len(args) > 1 and args[1] is not None)


# The decay handles attached to each optimizer (weakly: neither side is kept alive by this table).
_HANDLES: "weakref.WeakKeyDictionary[torch.optim.Optimizer, weakref.WeakSet]" = weakref.WeakKeyDictionary()


class EquivarianceDecay:
    """The handle ``equivariance_decay`` returns: a step pre-hook on the optimizer.

    ``remove()`` detaches it.  ``steps`` counts the steps it has acted on and ``host_seconds`` the
    host time it spent in them.  The handle keeps no reference on the model (only on the attached
    parameters, which the optimizer holds anyway) and adds nothing to any state_dict.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, lambda_perp, lambda_G=0.0,
                 mode: str = "decoupled", *, bias: bool = True, backend: str = "auto"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.lambda_perp = _check_lambda("lambda_perp", lambda_perp)
        self.lambda_G = _check_lambda("lambda_G", lambda_G)
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.backend = check_backend_name(backend)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
        model = D.unwrap(model)
        layers = attached_layers(model)
        if not layers:
            raise ValueError("model: no layer has a symmetry attached; call attach_symmetry / attach_symmetries "
                             "/ attach_regular_gcnn first")
        entries: List[_Entry] = []
        # One loop for plain and sharded models.  FSDP2 / DTensor: the update of a shard of whole
        # fields is the shard of the update, so every rank decays its own shard with the local
        # shard's table, with no collective (a rank whose shard is empty keeps an inactive entry).
        params, sharded = D.layer_params(model, layers)
        for l in params:
            sym, kind = l.sym, kind_of(l.sym.group)
            for pname in ("weight", "bias") if not sharded else ():
                if parametrize.is_parametrized(l.module, pname):
                    # module.weight is then recomputed from the parametrization's own parameters at
                    # every access: an in-place update of it would be lost.
                    raise ValueError(f"model: {l.name}.{pname} is parametrized (torch.nn.utils.parametrize), "
                                     "so the decay, which updates parameters in place, cannot act on it; add "
                                     f"model_penalty(model) to the loss instead, or remove the parametrization")
            w, sh = l.local_weight()
            table = None if w is None else kind.table(w, sym.group, sym.in_rep, sym.out_rep)
            if w is not None and table is None:
                # No orbit table (steerable symmetries): the layer's own projection, with the decay's
                # backend when one is named, else the one attached with the layer.
                b = self.backend if self.backend != "auto" else sym.backend
                entries.append(_Entry(l.weight(), None, False, f"{l.name}.weight", steerable=sym.group,
                                      steerable_backend=b))
                if bias and l.bias() is not None:
                    entries.append(_Entry(l.bias(), None, True, f"{l.name}.bias", steerable=sym.group))
                continue
            entries.append(_Entry(l.weight(), table, False, f"{l.name}.weight", sh))
            full_bias = l.bias() if bias else None
            if sharded and full_bias is not None and kind.bias_per_layer(sym.group, sym.out_rep):
                raise NotImplementedError(
                    f"model: {l.name}.bias lies on {sym.out_rep} output fields, whose projection the decay does "
                    "not serve on sharded (DTensor / FSDP2) models yet; pass bias=False (the weights are decayed)")
            if full_bias is not None:
                b, bsh = l.local_bias()
                table = None if b is None else kind.bias_table(b.numel(), sym.group, sym.out_rep)
                # A rank whose shard is empty keeps an inactive entry where the others decay the bias.
                if table is not None or (b is None and kind.bias_table(full_bias.numel(), sym.group, sym.out_rep)):
                    entries.append(_Entry(full_bias, table, True, f"{l.name}.bias", bsh))
        seen: Dict[int, str] = {}
        for e in entries:
            if id(e.param) in seen:
                raise ValueError(f"model: {e.name} is the same parameter as {seen[id(e.param)]} (tied weights); "
                                 "attach a symmetry to only one of the layers that share it")
            seen[id(e.param)] = e.name
        for device in {(e.param.to_local() if e.sharded else e.param).device for e in entries if e.steerable is None}:
            resolve(self.backend, device, "decay")  # an unusable backend fails here, not at the first step
        for e in entries:
            if e.steerable is not None and not e.is_bias:
                config_for(e.param, e.steerable, "trivial", "trivial", e.steerable_backend)  # likewise
        self._entries: Tuple[_Entry, ...] = tuple(entries)
        self._lambda_G_of = [0.0 if e.is_bias else self.lambda_G for e in entries]
        self._group_of: List[int] = []
        self._groups_key = None
        self._locate(optimizer)
        if mode == "decoupled":
            for i, g in enumerate(optimizer.param_groups):
                if "lr" not in g:
                    raise ValueError(f"optimizer: parameter group {i} has no 'lr'; the decoupled decay scales "
                                     "by each group's learning rate (use mode='coupled')")
        self.steps = 0
        self.host_seconds = 0.0
        self._warned = False
        for other in list(_HANDLES.get(optimizer, ())):
            if other.attached:
                twice = {id(p) for p in other.parameters} & set(seen)
                if twice:
                    raise ValueError(f"optimizer: already has an equivariance decay acting on "
                                     f"{seen[next(iter(twice))]} ({other!r}); a second one would apply the decay "
                                     "twice per step. Call remove() on the first handle, or give each decay its own "
                                     "layers (decays on one optimizer must not share a parameter)")
        self._optimizer = weakref.ref(optimizer)
        self._hook = optimizer.register_step_pre_hook(self._pre_step)
        _HANDLES.setdefault(optimizer, weakref.WeakSet()).add(self)

    # -- bookkeeping --

    @staticmethod
    def _key(optimizer) -> Tuple[int, ...]:
        # load_state_dict replaces the group dicts but keeps each group's params list.
        return tuple(id(g["params"]) for g in optimizer.param_groups)

    def _locate(self, optimizer) -> None:
        where = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        group_of = []
        for e in self._entries:
            if id(e.param) not in where:
                hint = ("pass bias=False to leave biases out, or add it to the optimizer" if e.is_bias
                        else "add it to the optimizer, or detach_symmetry(layer) to leave the layer out")
                raise ValueError(f"model: the attached parameter {e.name} is not in the optimizer's parameter "
                                 f"groups; {hint}")
            group_of.append(where[id(e.param)])
        self._group_of = group_of
        self._groups_key = self._key(optimizer)

    @property
    def parameters(self) -> List[torch.Tensor]:
        """The parameters the decay acts on (layer by layer: the weight, then a regular-field or
        steerable layer's bias)."""
        return [e.param for e in self._entries]

    def remove(self) -> None:
        """Detach from the optimizer; later steps are plain optimizer steps.  Idempotent."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer the decay was made for (None once it has been garbage-collected)."""
        return self._optimizer()

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def __repr__(self) -> str:
        return (f"EquivarianceDecay(mode={self.mode!r}, lambda_perp={self.lambda_perp:g}, "
                f"lambda_G={self.lambda_G:g}, tensors={len(self._entries)}, backend={self.backend!r}, "
                f"{'attached' if self.attached else 'removed'})")

    # -- the step --

    def _pre_step(self, optimizer, args, kwargs):
        if self.lambda_perp == 0.0 and self.lambda_G == 0.0:
            return None
        t0 = time.perf_counter()
        if self._key(optimizer) != self._groups_key:
            self._locate(optimizer)
        if self.mode == "coupled" and _closure_given(args, kwargs):
            raise RuntimeError("equivariance_decay(mode='coupled'): this optimizer step takes a closure, which "
                               "recomputes the gradients inside step(), after the decay added to them; put "
                               "model_penalty in the closure's loss instead, or use mode='decoupled'")
        # The hooks run outside the optimizer's own no_grad: in-place updates of leaves need it.
        with torch.no_grad():
            if self.mode == "decoupled":
                self._decoupled(optimizer)
            else:
                self._coupled(optimizer)
        self.steps += 1
        self.host_seconds += time.perf_counter() - t0
        return None

    def _decoupled(self, optimizer) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and float(found_inf) != 0.0:
            return  # a fused optimizer skips this step itself (GradScaler found inf/NaN)
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        targets, tables, c_dev, c_mean, steer = [], [], [], [], []
        for e, gi, lg in zip(self._entries, self._group_of, self._lambda_G_of):
            p = e.param
            if not p.requires_grad or not e.active:
                continue  # a frozen parameter gets no gradient from the penalty in the loss either
            lr = lrs[gi]
            if e.steerable is not None:
                steer.append((e, -2.0 * lr * self.lambda_perp, -2.0 * lr * lg))
                continue
            targets.append(p.to_local() if e.sharded else p)
            tables.append(e.table)
            c_dev.append(-2.0 * lr * self.lambda_perp)
            c_mean.append(-2.0 * lr * lg)
        c_all = c_dev + c_mean + [c for _, a, b in steer for c in (a, b)]
        if not self._warned and any(c < -1.0 for c in c_all):
            # 2 lr lambda > 1 overshoots P W (the part flips sign every step), > 2 diverges.
            self._warned = True
            warnings.warn(f"equivariance_decay: 2 * lr * lambda = {-min(c_all):g} > 1 overshoots the "
                          "projection (the decayed part changes sign every step); lower lambda_perp / lambda_G",
                          RuntimeWarning, stacklevel=4)
        if targets:
            apply_decay_(targets, None, tables, c_dev, c_mean, backend=self.backend)
        for e, a, b in steer:
            _steerable_update_(e.param, e.param, e, a, b)

    def _coupled(self, optimizer) -> None:
        scale = getattr(optimizer, "grad_scale", None)
        # A fused optimizer with a GradScaler divides the gradients by grad_scale inside its step.
        s = float(scale) if isinstance(scale, torch.Tensor) else 1.0
        grads, weights, tables, c_dev, c_mean = [], [], [], [], []
        for e, lg in zip(self._entries, self._lambda_G_of):
            p = e.param
            if not p.requires_grad or not e.active:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
            g = p.grad
            if e.sharded:
                g, p = g.to_local(), p.to_local()
            if g.is_sparse or g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(f"equivariance_decay(mode='coupled'): the gradient of {e.name} is "
                                   f"{'sparse' if g.is_sparse else f'{g.dtype} {tuple(g.shape)}'}; expected a dense "
                                   f"{p.dtype} gradient of shape {tuple(p.shape)}")
            if e.steerable is not None:
                _steerable_update_(g, p, e, 2.0 * self.lambda_perp * s, 2.0 * lg * s)
                continue
            grads.append(g)
            weights.append(p)
            tables.append(e.table)
            c_dev.append(2.0 * self.lambda_perp * s)
            c_mean.append(2.0 * lg * s)
        if grads:
            apply_decay_(grads, weights, tables, c_dev, c_mean, backend=self.backend)


def equivariance_decay(optimizer: torch.optim.Optimizer, model: nn.Module, lambda_perp: float,
                       lambda_G: float = 0.0, mode: str = "decoupled", *, bias: bool = True,
                       backend: str = "auto") -> EquivarianceDecay:
    """Attach the equivariance decay of ``model``'s attached layers to ``optimizer``.

    Before every ``optimizer.step()``, each attached weight ``W`` (and, with ``bias=True``, each
    regular-field bias, on the ``lambda_perp`` term) gets

    - ``mode="decoupled"``: ``W <- W - lr (2 lambda_perp (W - P W) + 2 lambda_G P W)`` with its
      parameter group's current ``lr`` (the decoupled analogue of the penalty, as AdamW's weight decay);
    - ``mode="coupled"``: ``W.grad += 2 lambda_perp (W - P W) + 2 lambda_G P W`` (created if None):
      exactly what ``model_penalty(model, lambda_perp, lambda_G)`` in the loss contributes.

    Parameters with ``requires_grad=False`` are left alone.  The layers are those attached when the
    handle is made.  Returns an ``EquivarianceDecay``; ``handle.remove()`` detaches it.  ``backend``:
    "auto" (the fused C++/CUDA op where built), "reference", "cpp", "cuda" or "triton"; a named
    backend also computes the projections of steerable layers (with "auto" they use the backend
    attached with the layer).

    Raises TypeError / ValueError naming the argument for a bad optimizer, model, lambda or mode; a
    model with no attached layer; or an attached parameter that is not in the optimizer.
    """
    return EquivarianceDecay(optimizer, model, lambda_perp, lambda_G, mode, bias=bias, backend=backend)
