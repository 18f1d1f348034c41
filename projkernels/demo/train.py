"""Training one demo model with one regulariser, timing the regulariser's share of each step."""
from __future__ import annotations

import sys
import time
from typing import Dict

import torch
import torch.nn.functional as F

from ..decay import equivariance_decay
from ..model import equivariance_report, model_penalty, project_
from .metrics import equivariance_error, relative_error
from .models import build_model, project_grads_, sample_equivariance_loss

__all__ = ["METHODS", "Progress", "train_run"]

METHODS = ("none", "penalty", "decay", "projected", "sample")


class Progress:
    """A one-line progress bar on stderr, redrawn at most every ``interval`` seconds."""

    def __init__(self, total: int, stream=None, width: int = 28, interval: float = 0.1, enabled: bool = True):
        self.total, self.done, self.width, self.interval = max(total, 1), 0, width, interval
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.start, self.last = enabled, time.perf_counter(), 0.0

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            frac = min(self.done / self.total, 1.0)
            fill = int(round(frac * self.width))
            elapsed = now - self.start
            eta = elapsed / frac - elapsed if frac > 0 else 0.0
            self.stream.write(f"\r[{'#' * fill}{'.' * (self.width - fill)}] {100 * frac:5.1f}% "
                              f"{elapsed:5.1f}s eta {eta:5.1f}s {note[:40]:<40}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def train_run(method: str, weight: float, data: Dict[str, torch.Tensor], args, progress: Progress,
              label: str) -> dict:
    """Train one model and score it.  ``method``: 'none', 'penalty' (``weight`` = lambda_perp),
    'decay' (the decoupled equivariance decay inside the optimizer step, ``weight`` = lambda_perp),
    'projected' (an exact G-CNN throughout) or 'sample' (``weight`` = mu of the sample-based loss).

    Timing: the regulariser's share is its extra work, measured with perf_counter after the task
    loss's backward (for the projected run: the gradient and weight projections); the first steps
    are left out as warm-up.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    torch.manual_seed(args.seed)  # same initial weights and batches for every run
    model = build_model(args.fields, args.depth, args.device)
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr * 0.05)
    # The decay runs inside opt.step(); its own timer (host seconds in the step pre-hook) gives its share.
    decay = equivariance_decay(opt, model, weight) if method == "decay" else None
    x_tr, y_tr = data["x_train"], data["y_train"]
    g = torch.Generator().manual_seed(args.seed + 7)
    warmup = min(5, args.steps // 4)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    step_t, reg_t = 0.0, 0.0
    for step in range(args.steps):
        idx = torch.randint(0, x_tr.shape[0], (args.batch,), generator=g).to(args.device)
        xb, yb = x_tr[idx], y_tr[idx]
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(xb)
        loss = F.mse_loss(out, yb)
        loss.backward(retain_graph=method == "sample")
        sync()
        t1 = time.perf_counter()
        if method == "penalty":
            model_penalty(model, lambda_perp=weight).backward()
        elif method == "sample":
            (weight * sample_equivariance_loss(model, xb, out, generator=g)).backward()
        elif method == "projected":
            project_grads_(model)
        sync()
        t2 = time.perf_counter()
        decay_s = decay.host_seconds if decay is not None else 0.0
        opt.step()
        sched.step()
        sync()
        t3 = time.perf_counter()
        if method == "projected":
            project_(model)  # only removes rounding drift; the step itself is already equivariant
            sync()
        t4 = time.perf_counter()
        if step >= warmup:
            step_t += t4 - t0
            reg_t += (t2 - t1) + (t4 - t3)
            if decay is not None:
                reg_t += decay.host_seconds - decay_s
        progress.update(1, f"{label} loss {loss.item():.3g}")
    timed = max(args.steps - warmup, 1)
    if decay is not None:
        decay.remove()
    model.eval()
    return {
        "method": method, "weight": weight, "label": label,
        "test_error": relative_error(model, data["x_test"], data["y_test"]),
        "train_error": relative_error(model, x_tr, y_tr),
        "equivariance_error": equivariance_error(model, data["x_test"]),
        "ms_per_step": 1e3 * step_t / timed,
        "regulariser_ms_per_step": 1e3 * reg_t / timed,
        "regulariser_share": reg_t / step_t if step_t > 0 else 0.0,
        "layers": equivariance_report(model),
    }
