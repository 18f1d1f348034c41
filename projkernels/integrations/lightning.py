"""Lightning: the projection penalty (or the decoupled equivariance decay) and the equivariance report
as a ``Callback``.

    import lightning.pytorch as L
    from projkernels.integrations.lightning import EquivarianceCallback

    pk.attach_regular_gcnn(module.net, "C4", first_in="trivial", last_out="trivial")
    trainer = L.Trainer(callbacks=[EquivarianceCallback(lambda_perp=1.0, log_every_n_steps=50)])

Needs ``lightning`` (extra ``lightning``).

Why the gradient is added in ``on_before_optimizer_step``.  A callback cannot change the loss that
``training_step`` returns, so the penalty's gradient has to reach ``.grad`` another way, and at a time
when the task gradients are final.  Lightning calls ``optimizer.step(closure)``, and the closure runs
``training_step`` and the backward *inside* ``step()``: an optimizer step pre-hook (what
``projkernels.equivariance_decay`` is) runs before the closure, so it would add to stale gradients
(the coupled decay refuses closures for that reason) and a decoupled update would act before the
forward pass.  ``on_before_optimizer_step`` runs after the closure's backward (after all micro-batches
of gradient accumulation), with the gradients already unscaled under mixed precision and before
gradient clipping: adding ``d(lambda_perp * model_penalty)/dW`` there gives exactly the gradients of
``loss + model_penalty(model, lambda_perp, lambda_G)``, clipped as they would be.  The penalty's
gradient is taken with ``torch.autograd.grad`` (no ``.grad`` accumulation, so DDP's gradient hooks
do not fire and nothing is all-reduced twice): under DDP every rank holds the same weights and adds
the same term to the averaged task gradient; under FSDP2 (``ModelParallelStrategy`` with
``fully_shard`` in ``configure_model``) each rank gets its own shards' part, exactly the
single-process gradient (projkernels/distributed.py derives the scale).  Lightning's FSDP1
``FSDPStrategy`` keeps flattened parameters, which the penalty cannot read: it is refused.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

try:
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    from ..install_hints import extra_hint
    raise ImportError("projkernels.integrations.lightning needs the lightning package: "
                      f"{extra_hint('lightning', ['lightning'])}") from exc

import projkernels as pk

from . import report_metrics

__all__ = ["EquivarianceCallback"]

MODES = ("penalty", "decoupled", "log")


class EquivarianceCallback(L.Callback):
    """Adds the projection penalty of the LightningModule's attached layers to the training objective,
    and logs the equivariance report every ``log_every_n_steps`` optimizer steps to every logger of the
    trainer.

    ``mode``:

    - ``"penalty"`` (default): the gradients become exactly those of
      ``loss + model_penalty(module, lambda_perp, lambda_G, bias=bias)`` (added in
      ``on_before_optimizer_step``; see the module docstring for why there);
    - ``"decoupled"``: the equivariance decay ``W <- W - lr * d(model_penalty)/dW`` with each parameter
      group's current ``lr``, just before the optimizer's update (as AdamW applies weight decay; under
      Adam a lambda means a different strength than in ``"penalty"``);
    - ``"log"``: logging only (the module adds ``model_penalty`` to its loss itself).

    Logged (``prefix`` = ``"equivariance"``): ``{prefix}/objective``, the term
    ``model_penalty(module, lambda_perp, lambda_G)`` (0 in ``"log"`` mode: nothing is added), and for
    every attached layer ``{prefix}/{layer}/relative`` (``||W - P(W)|| / ||W||``), ``/penalty``,
    ``/bias_relative`` where defined and, with ``spectrum=True``, ``/spectrum/{irrep}`` (each irrep's
    share of ``||W||^2``); ``{prefix}/penalty`` is the layers' summed ``||W - P(W)||^2``.  Every logger
    gets these as metrics at ``trainer.global_step``; a ``TensorBoardLogger`` also gets each layer's
    spectrum as a histogram (``projkernels.integrations.tensorboard.write_report``).  Steps are
    counted as Lightning counts them (optimizer steps): step 0 is logged before training.

    Under FSDP2 every rank computes the report (a collective), the loggers write on rank 0.
    """

    def __init__(self, lambda_perp: float = 1.0, lambda_G: float = 0.0, *, mode: str = "penalty",
                 log_every_n_steps: Optional[int] = 50, spectrum: bool = True, bias: bool = True,
                 prefix: str = "equivariance"):
        super().__init__()
        for name, value in (("lambda_perp", lambda_perp), ("lambda_G", lambda_G)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < float("inf"):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool)
                                              or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps: expected an int >= 1 or None (no logging), got {log_every_n_steps!r}")
        self.lambda_perp, self.lambda_G = float(lambda_perp), float(lambda_G)
        self.mode = mode
        self.log_every_n_steps = log_every_n_steps
        self.spectrum = spectrum
        self.bias = bias
        self.prefix = prefix
        self._last_logged: Optional[int] = None

    # -- setup --

    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        strategy = type(trainer.strategy).__name__
        if strategy.startswith("FSDPStrategy"):
            raise TypeError("trainer: Lightning's FSDPStrategy (FSDP1) keeps flattened parameters, which the "
                            "projection penalty cannot read; use strategy=ModelParallelStrategy() with "
                            "torch.distributed.fsdp.fully_shard applied in configure_model (FSDP2), or DDP")
        if not pk.attached_layers(pl_module):
            raise ValueError("pl_module: no layer has a symmetry attached; call pk.attach_regular_gcnn / "
                             "pk.attach_symmetry on the module's layers (in __init__ or configure_model) "
                             "before fitting")
        self._last_logged = None
        self._maybe_log(trainer, pl_module)  # the starting point, step 0

    # -- the penalty --

    def _parameters(self, pl_module) -> List[torch.Tensor]:
        params = []
        for _, module, _ in pk.attached_layers(pl_module):
            params.append(module.weight)
            if self.bias and getattr(module, "bias", None) is not None:
                params.append(module.bias)
        return [p for p in params if p.requires_grad]

    def penalty_gradients(self, pl_module) -> Dict[torch.Tensor, torch.Tensor]:
        """``{parameter: d model_penalty(pl_module, lambda_perp, lambda_G, bias) / d parameter}`` for the
        attached parameters that require a gradient (a collective under FSDP2)."""
        params = self._parameters(pl_module)
        with torch.enable_grad():
            total = pk.model_penalty(pl_module, self.lambda_perp, self.lambda_G, bias=self.bias)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        return {p: g for p, g in zip(params, grads) if g is not None}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mode == "log" or (self.lambda_perp == 0.0 and self.lambda_G == 0.0):
            return
        grads = self.penalty_gradients(pl_module)
        lr_of = {id(p): g.get("lr") for g in optimizer.param_groups for p in g["params"]}
        with torch.no_grad():
            for p, g in grads.items():
                if id(p) not in lr_of:
                    continue  # another optimizer's parameter: its own on_before_optimizer_step handles it
                if self.mode == "penalty":
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.add_(g)
                else:
                    lr = lr_of[id(p)]
                    if lr is None:
                        raise ValueError("mode='decoupled': the optimizer's parameter groups have no 'lr'; "
                                         "use mode='penalty'")
                    p.sub_(g, alpha=float(lr))

    # -- logging --

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_log(trainer, pl_module)

    def _maybe_log(self, trainer, pl_module) -> None:
        n = self.log_every_n_steps
        step = trainer.global_step
        if n is None or step % n != 0 or step == self._last_logged:
            return  # several micro-batches of gradient accumulation share one global step
        self._last_logged = step
        rows = pk.equivariance_report(pl_module)  # every rank: a collective under FSDP2
        metrics = report_metrics(rows, prefix=self.prefix, spectrum=self.spectrum)
        if self.mode == "log":
            metrics[f"{self.prefix}/objective"] = 0.0
        else:
            with torch.no_grad():
                metrics[f"{self.prefix}/objective"] = float(
                    pk.model_penalty(pl_module, self.lambda_perp, self.lambda_G, bias=self.bias))
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.spectrum and isinstance(logger, TensorBoardLogger):
                from .tensorboard import write_spectrum_histograms
                write_spectrum_histograms(logger.experiment, rows, step, prefix=self.prefix)
