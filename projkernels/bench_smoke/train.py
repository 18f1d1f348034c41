"""Training one smoke model with one route, timing the regulariser's share of each step, and scoring it."""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..decay import equivariance_decay
from ..model import model_penalty, project_
from . import symmetry as sym
from .models import (build_model, project_grads_, relaxation_loss, rpp_loss, sample_equivariance_loss)

__all__ = ["train_run", "rmse", "equivariance_error", "n_parameters"]


@torch.no_grad()
def rmse(model, x: torch.Tensor, y: torch.Tensor, scale: float, batch: int = 256) -> float:
    """Root mean square error of the predicted next frame, in the simulation's velocity units."""
    sq = sum(float((model(x[i:i + batch]) - y[i:i + batch]).square().sum()) for i in range(0, len(x), batch))
    return scale * (sq / y.numel()) ** 0.5


@torch.no_grad()
def equivariance_error(model, x: torch.Tensor, batch: int = 256) -> float:
    """Mean over inputs and the 4 quarter turns (identity included) of ||f(gx) - g f(x)|| / ||f(x)||."""
    errs = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        fx = model(xb)
        norm = fx.flatten(1).norm(dim=1).clamp_min(1e-12)
        errs += [(model(sym.rotate_velocity(xb, k)) - sym.rotate_velocity(fx, k)).flatten(1).norm(dim=1) / norm
                 for k in range(sym.ORDER)]
    return float(torch.cat(errs).mean())


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_run(method: str, weight: float, splits: Dict, args, seed: int, progress, label: str,
              keep: Optional[dict] = None) -> dict:
    """Train ``method`` ('none', 'penalty', 'decay', 'projected', 'rpp', 'relaxed', 'sample', 'so2'; ``weight`` is
    its lambda / mu / prior weight) from ``seed`` and score it on every split.  With ``keep`` given, the
    seed-0 model's prediction of the last future sample is stored in it under ``(method, weight)``.

    Timing as in the demo: the regulariser's extra work is timed after the task loss's backward (for
    the projected and RPP runs, the gradient and weight projections; for the decay, its own timer inside
    ``opt.step()``; for the relaxed conv the relaxation loss, while its banks' projections in the forward
    pass count as model time); the first steps are left out as warm-up.
    """
    torch.manual_seed(seed)
    model = build_model(args.history, args.fields, args.depth, args.mode, method, args.device, args.banks)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr * 0.05)
    decay = equivariance_decay(opt, model, weight) if method == "decay" else None
    x_tr, y_tr = splits["train"]["x"], splits["train"]["y"]
    g = torch.Generator().manual_seed(seed + 7)
    warmup = min(5, args.steps // 4)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    step_t = reg_t = 0.0
    exact_path = method in ("projected", "rpp")
    for step in range(args.steps):
        idx = torch.randint(0, x_tr.shape[0], (min(args.batch, x_tr.shape[0]),), generator=g).to(x_tr.device)
        xb, yb = x_tr[idx], y_tr[idx]
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(xb)
        loss = F.mse_loss(out, yb)
        loss.backward(retain_graph=method == "sample")
        sync()
        t1 = time.perf_counter()
        if method in ("penalty", "so2"):
            model_penalty(model, lambda_perp=weight).backward()
        elif method == "sample":
            (weight * sample_equivariance_loss(model, xb, out, generator=g)).backward()
        elif method == "relaxed":
            (weight * relaxation_loss(model)).backward()
        elif method == "rpp":
            rpp_loss(model, weight, args.rpp_eq_l2).backward()
        if exact_path:
            project_grads_(model)
        sync()
        t2 = time.perf_counter()
        decay_s = decay.host_seconds if decay is not None else 0.0
        opt.step()
        sched.step()
        sync()
        t3 = time.perf_counter()
        if exact_path:
            project_(model)  # removes rounding drift; the projected-gradient step is already equivariant
            sync()
        t4 = time.perf_counter()
        if step >= warmup:
            step_t += t4 - t0
            reg_t += (t2 - t1) + (t4 - t3)
            if decay is not None:
                reg_t += decay.host_seconds - decay_s
        progress.update(1, f"{label} s{seed} loss {loss.item():.3g}")
    timed = max(args.steps - warmup, 1)
    if decay is not None:
        decay.remove()
    model.eval()
    scale = splits["scale"]
    row = {"method": method, "weight": weight, "label": label, "seed": seed,
           "parameters": n_parameters(model),
           "ms_per_step": 1e3 * step_t / timed, "regulariser_ms_per_step": 1e3 * reg_t / timed,
           "regulariser_share": reg_t / step_t if step_t > 0 else 0.0,
           "train_rmse": rmse(model, x_tr, y_tr, scale)}
    for split in ("validation", "future", "domain"):
        row[f"{split}_rmse"] = rmse(model, splits[split]["x"], splits[split]["y"], scale)
    row["equivariance_error"] = equivariance_error(model, splits["future"]["x"])
    if keep is not None and seed == 0:  # one future frame predicted by each route, for the figure
        with torch.no_grad():
            keep[(method, weight)] = model(splits["future"]["x"][-1:]).cpu()[0]
    return row
