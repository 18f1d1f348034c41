"""Cost of one equivariance-decay step over the 20-layer bench model.

    python bench/decay_bench.py                 # CPU, 1 thread
    python bench/decay_bench.py --device cuda   # GPU (device time per step)

Compared over the same weights (the model of ``common.model_specs``: a lifting conv, 18
regular -> regular C4 convs and a 1x1 head, as ``nn.Conv2d`` layers with symmetries attached):

- decay step (decoupled / coupled): the whole optimizer pre-hook, host code included
  (``W <- W - lr 2 lambda (W - P W)`` or ``grad += 2 lambda (W - P W)``, one fused pass);
- decay op only: the fused multi-tensor op without the hook's bookkeeping;
- model_penalty fwd+bwd: the penalty in the loss, its value and its gradient;
- torch._foreach_mul_: one in-place multi-tensor scale of the same weights (the floor for any
  in-place update that reads and writes every weight once).

The target is decay step <= 2x _foreach_mul_ (CPU, 1 thread).  A second table repeats the rows on the
same 20 layers with one field each ("tiny"), where every method costs its host overhead only: the
cost of the decay's dispatch and bookkeeping against that of one _foreach_mul_.  ``main()`` prints
both tables and returns the rows; ``bench/run.py`` can call it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import projkernels as pk  # noqa: E402
from projkernels import decay as D  # noqa: E402

import common as C  # noqa: E402

LAMBDA = 1e-2
LR = 1e-3


def build_model(specs, device, dtype=torch.float32) -> nn.Module:
    """The bench model's convs as nn.Conv2d layers (no bias: the same tensors as the other rows)."""
    layers = nn.ModuleList()
    weights = C.model_weights(specs, device, dtype)
    for (shape, group, in_rep, out_rep), w in zip(specs, weights):
        conv = nn.Conv2d(shape[1], shape[0], shape[2:], bias=False).to(device=device, dtype=dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
        pk.attach_symmetry(conv, group, in_rep, out_rep)
        layers.append(conv)
    return layers


def methods(model: nn.Module, device, backend: str = "auto") -> Dict[str, callable]:
    """name -> a callable doing one step's regulariser work on ``model``'s weights."""
    params = [p for p in model.parameters()]
    out = {}
    for mode in D.MODES:
        opt = torch.optim.SGD(params, lr=LR)
        h = pk.equivariance_decay(opt, model, LAMBDA, mode=mode, backend=backend)
        h.remove()  # called directly below, without an optimizer step around it
        if mode == "coupled":
            for p in params:
                p.grad = torch.zeros_like(p)
        out[f"decay step ({mode})"] = (lambda h=h, opt=opt: h._pre_step(opt, (opt,), {}))
    tables = [e.table for e in h._entries]
    coef = [-2 * LR * LAMBDA] * len(params)
    zero = [0.0] * len(params)
    out["decay op only"] = lambda: D.apply_decay_(params, None, tables, coef, zero, backend=backend)

    def penalty():
        torch.autograd.grad(pk.model_penalty(model, LAMBDA), params)
    out["model_penalty fwd+bwd"] = penalty
    detached = [p.detach() for p in params]
    out["torch._foreach_mul_"] = lambda: torch._foreach_mul_(detached, 1.0)
    return out


def model_specs(size: str):
    """"default" / "large": the bench model; "tiny": the same 20 layers with one field each, where
    every method costs its host overhead (dispatch, bookkeeping) and almost no arithmetic."""
    if size == "tiny":
        import baselines as bl
        return bl.gcnn_layer_specs([1] * len(C.MODEL_WIDTHS))
    return C.model_specs(size == "large")


def measure(device="cpu", threads: Optional[int] = 1, size: str = "default", backend: str = "auto",
            min_time: float = 0.3, passes: int = 3) -> List[dict]:
    """Seconds per call of every method (best of ``passes`` measurements), with ratios to _foreach_mul_."""
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        specs = model_specs(size)
        model = build_model(specs, device)
        fns = methods(model, device, backend)
        times = {}
        for _ in range(passes):
            for name, fn in fns.items():
                def call(fn=fn):
                    fn()
                    C.sync(device)
                t = C.time_call(call, device, min_time=min_time)
                times[name] = min(times.get(name, t), t)
    finally:
        torch.set_num_threads(old_threads)
    floor = times["torch._foreach_mul_"]
    n = sum(p.numel() for p in model.parameters())
    return [{"method": k, "ms": 1e3 * v, "x_foreach_mul": v / floor, "layers": len(specs), "numel": n, "size": size,
             "device": str(device), "threads": threads if device.type == "cpu" else None} for k, v in times.items()]


def format_rows(rows: List[dict]) -> str:
    head = ["method", "ms / step", "x _foreach_mul_"]
    body = [[r["method"], f"{r['ms']:.3f}", f"{r['x_foreach_mul']:.2f}"] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(3)]
    line = lambda x: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths)))
    r0 = rows[0]
    title = (f"equivariance decay, {r0['size']} {r0['layers']}-layer model ({r0['numel']:,} weights, float32) "
             f"on {r0['device']}"
             + (f", {r0['threads']} thread(s)" if r0["threads"] else ""))
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(x) for x in body])


def main(argv=()) -> List[dict]:
    """Print the tables; ``argv`` as on the command line (the default: CPU, 1 thread, both sizes)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: leave torch's default)")
    p.add_argument("--large", action="store_true", help="the wider model of common.MODEL_WIDTHS_LARGE")
    p.add_argument("--backend", default="auto")
    p.add_argument("--min-time", type=float, default=0.3)
    args = p.parse_args(argv)
    rows = []
    for size in ("large" if args.large else "default", "tiny"):
        part = measure(args.device, args.threads or None, size, args.backend, args.min_time)
        print(format_rows(part) + "\n")
        rows += part
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
