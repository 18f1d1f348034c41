"""Host cost of the public API against native PyTorch ops, on the CPU, one thread.

Each entry times a call of ours and a native baseline in the same run, interleaved (so a busy
machine slows both alike), and reports the ratio of the best times.  The cases:

- projected_penalty forward vs ``(w * w).sum()``, on C4 regular 8x8x3x3 float32 (target <= 2x);
- its forward+backward vs ``torch.autograd.grad((w * w).sum(), [w])`` (target <= 1.5x);
- multi_penalty over 20 such weights, forward+backward, vs that single native forward+backward
  (target <= 2.5x), and vs the native ops over the same 20 weights;
- model_penalty on the 20-layer bench model (bench/common.py ``model_specs``), forward+backward,
  vs the single native forward+backward (target <= 3x) and vs the native ops over the model's
  weights; the raw kernels' own time on those weights is listed, so the host overhead is visible;
  and the same on the model's 20 layers with one field each, where the host cost is all there is;
- floors: the cheapest native graphs that hand the same number of gradients to autograd
  (``stack`` or ``cat``, then ``sum``), against the single-weight baseline: what the autograd
  engine alone costs for 20 (or 40) gradients.

    python bench/run.py --host     (or python bench/host.py)

With glibc's default malloc, the model's 11.7 MB of gradients may be mapped fresh on every call,
and the first-touch page faults (milliseconds) land on whichever call allocates; start the process
with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` to keep the heap and
compare compute with compute.  The line above the table says which setting a run used.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import projkernels as pk  # noqa: E402

SPEC = ("C4", "regular", "regular")
SHAPE = (8, 8, 3, 3)
N_WEIGHTS = 20


# The clock: "thread" (the calling thread's CPU time, the default) or "wall".  Everything measured
# here runs on the calling thread (one intra-op thread; the autograd engine runs CPU work on the
# caller), so the thread's CPU time is its cost, and time the scheduler gives to other processes on
# a shared machine is left out.  main() sets it from --clock.
CLOCK = "thread"


def _now() -> float:
    return time.thread_time() if CLOCK == "thread" else time.perf_counter()


def best_of(fn: Callable[[], object], number: int, repeats: int) -> float:
    """Best per-call time in microseconds over ``repeats`` runs of ``number`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = _now()
        for _ in range(number):
            fn()
        best = min(best, (_now() - t0) / number)
    return best * 1e6


def interleaved(fns: Dict[str, Callable[[], object]], number: int, rounds: int = 7) -> Dict[str, float]:
    """Best times of several callables, measured in alternation."""
    for fn in fns.values():
        for _ in range(max(10, number // 10)):
            fn()  # warm-up: caches built, allocator settled
    out = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k] = min(out[k], best_of(fn, number, 1))
    return out


def bench_model(seed: int = 0, tiny: bool = False):
    """The 20-layer bench model (bench/common.py specs) as Conv2d layers with their symmetries;
    ``tiny``: the same 20 layers with one field each (2,740 weights), where host cost dominates."""
    import baselines as bl
    import common as C
    torch.manual_seed(seed)
    layers = []
    specs = bl.gcnn_layer_specs([1] * len(C.MODEL_WIDTHS)) if tiny else C.model_specs(False)
    for shape, group, in_rep, out_rep in specs:
        conv = nn.Conv2d(shape[1], shape[0], shape[2], bias=True)
        pk.attach_symmetry(conv, group, in_rep, out_rep)
        layers.append(conv)
    return nn.Sequential(*layers)


def measure(number: int = 2000, rounds: int = 7) -> List[dict]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=g).requires_grad_()
    ws = [torch.randn(SHAPE, generator=g).requires_grad_() for _ in range(N_WEIGHTS)]
    items = [(x, *SPEC) for x in ws]
    one = [w]

    rows = []

    def row(name, ours, base, ratio_name, target=None, note=""):
        rows.append({"case": name, "ours_us": ours, "baseline": ratio_name, "baseline_us": base,
                     "ratio": ours / base, "target": target, "note": note})

    # The same public op called through torch.ops with its table and geometry as Python arguments
    # (the route before bound calls, csrc/python/python_calls.cpp): what the argument conversion costs.
    from projkernels.dispatch.config import config_for
    bound = config_for(w, *SPEC, "auto").ops.penalty_energy.__self__
    boxed, table, geometry = torch.ops.projkernels_C.penalty_energy.default, bound.table, bound.geometry
    t = interleaved({
        "native fwd": lambda: (w * w).sum(),
        "ours fwd": lambda: pk.projected_penalty(w, *SPEC),
        "torch.ops fwd": lambda: boxed(w, table, geometry)[0],
        "native fwd+bwd": lambda: torch.autograd.grad((w * w).sum(), one),
        "ours fwd+bwd": lambda: torch.autograd.grad(pk.projected_penalty(w, *SPEC), one),
    }, number, rounds)
    row("projected_penalty fwd (C4 reg 8x8x3x3 f32)", t["ours fwd"], t["native fwd"], "(w*w).sum()", 2.0)
    row("projected_penalty fwd+bwd", t["ours fwd+bwd"], t["native fwd+bwd"], "grad((w*w).sum())", 1.5)
    row("its public op called through torch.ops, fwd (table converted per call)", t["torch.ops fwd"],
        t["native fwd"], "(w*w).sum()")

    # The Python backends' route (projkernels/library/autograd.py), measured on the reference backend: its
    # host cost over the backend's own kernels is what the Triton backend pays on a GPU too.
    cfg = config_for(w, *SPEC, "reference")
    zero = torch.zeros(())

    def reference_kernels():
        cfg.backend.forward(w.detach(), cfg.table)
        cfg.backend.backward(w.detach(), cfg.table, zero, zero)

    t = interleaved({
        "ours": lambda: torch.autograd.grad(pk.projected_penalty(w, *SPEC, backend="reference"), one),
        "kernels": reference_kernels,
    }, max(1, number // 4), rounds)
    row("projected_penalty fwd+bwd, backend=reference", t["ours"], t["kernels"],
        "the reference backend's forward + backward alone", None, "host overhead of the Python route")

    ops = torch.ops.projkernels_C
    small = [x.detach() for x in ws]
    sa = pk.dispatch.multi.plan_for(pk.dispatch.multi_inputs.collect(items)[1], "auto").call
    s_offsets, s_inv_stab, s_geometry = sa.offsets, sa.inv_stab, sa.geometry  # read once (properties build lists)
    ones20, zeros20 = torch.ones(N_WEIGHTS), torch.zeros(N_WEIGHTS)

    def small_kernels():
        ops.multi_forward(small, s_offsets, s_inv_stab, s_geometry)
        ops.multi_backward(small, ones20, zeros20, s_offsets, s_inv_stab, s_geometry)

    t = interleaved({
        "native single": lambda: torch.autograd.grad((w * w).sum(), one),
        "ours": lambda: torch.autograd.grad(pk.multi_penalty(items)[0], ws),
        "native 20": lambda: torch.autograd.grad(sum((x * x).sum() for x in ws), ws),
        "raw kernels": small_kernels,
        "native one node": lambda: torch.autograd.grad(torch.stack(ws).square().sum(), ws),
        "engine floor": lambda: torch.autograd.grad(torch.stack(ws).sum(), ws),
    }, max(1, number // 10), rounds)
    row(f"multi_penalty {N_WEIGHTS} weights fwd+bwd", t["ours"], t["native single"], "grad((w*w).sum()), one weight",
        2.5)
    row(f"multi_penalty {N_WEIGHTS} weights fwd+bwd", t["ours"], t["native 20"],
        f"grad(sum (w*w).sum()), same {N_WEIGHTS} weights")
    row(f"multi_penalty {N_WEIGHTS} weights fwd+bwd", t["ours"], t["native one node"],
        f"grad(stack(ws).square().sum()), native ops taking the {N_WEIGHTS} weights as one input list")
    row(f"multi_penalty {N_WEIGHTS} weights fwd+bwd", t["ours"], t["raw kernels"],
        "the raw multi_forward + multi_backward kernels alone", None, "host overhead = ours - kernels")
    # What any op pays to hand 20 gradients to autograd: the cheapest native graph with 20 inputs
    # (one stack node, one sum node, no arithmetic to speak of) against the single-weight baseline.
    row(f"floor: grad(stack(ws).sum()), {N_WEIGHTS} weights", t["engine floor"], t["native single"],
        "grad((w*w).sum()), one weight", None, "the autograd engine's cost of 20 gradients")

    model = bench_model()
    # The penalised parameters: every weight, and the biases of regular output fields.
    params = [m.weight for m in model] + [m.bias for m in model if pk.get_symmetry(m).out_rep == "regular"]
    weights = [m.weight.detach() for m in model]
    plan = pk.model._model_plan(model)[0].weight_plans[0][1]
    a = plan.call
    m_offsets, m_inv_stab, m_geometry = a.offsets, a.inv_stab, a.geometry  # read once (properties build lists)
    gp, ge = torch.ones(len(weights)), torch.zeros(len(weights))  # what model_penalty passes (lambda_G = 0)

    def raw_kernels():
        ops.multi_forward(weights, m_offsets, m_inv_stab, m_geometry)
        ops.multi_backward(weights, gp, ge, m_offsets, m_inv_stab, m_geometry)

    n_model = max(1, number // 100)
    t = interleaved({
        "native single": lambda: torch.autograd.grad((w * w).sum(), one),
        "ours": lambda: torch.autograd.grad(pk.model_penalty(model), params),
        "native model": lambda: torch.autograd.grad(sum((p * p).sum() for p in params), params),
        "raw kernels": raw_kernels,
    }, n_model, rounds)
    numel = sum(p.numel() for p in params)
    row("model_penalty, 20-layer bench model, fwd+bwd", t["ours"], t["native single"],
        "grad((w*w).sum()), one 8x8x3x3 weight", 3.0, f"{numel / 1e6:.2f} M parameters")
    row("model_penalty, 20-layer bench model, fwd+bwd", t["ours"], t["native model"],
        "grad(sum (p*p).sum()), the model's parameters")
    row("model_penalty, 20-layer bench model, fwd+bwd", t["ours"], t["raw kernels"],
        "the raw multi_forward + multi_backward kernels alone", None, "host overhead = ours - kernels")

    # The same 20 layers with one field each: the host cost of model_penalty without its arithmetic.
    tiny = bench_model(tiny=True)
    tiny_params = [m.weight for m in tiny] + [m.bias for m in tiny if pk.get_symmetry(m).out_rep == "regular"]
    t = interleaved({
        "native single": lambda: torch.autograd.grad((w * w).sum(), one),
        "ours": lambda: torch.autograd.grad(pk.model_penalty(tiny), tiny_params),
        "native model": lambda: torch.autograd.grad(sum((p * p).sum() for p in tiny_params), tiny_params),
        "engine floor": lambda: torch.autograd.grad(torch.cat([p.reshape(-1) for p in tiny_params]).sum(),
                                                    tiny_params),
    }, max(1, number // 10), rounds)
    n_tiny = sum(p.numel() for p in tiny_params)
    note = f"{len(tiny_params)} tensors, {n_tiny} parameters"
    row("model_penalty, tiny 20-layer model, fwd+bwd", t["ours"], t["native single"],
        "grad((w*w).sum()), one 8x8x3x3 weight", 3.0, note)
    row("model_penalty, tiny 20-layer model, fwd+bwd", t["ours"], t["native model"],
        "grad(sum (p*p).sum()), the model's parameters")
    row("floor: grad(cat(params).sum()), tiny model", t["engine floor"], t["native single"],
        "grad((w*w).sum()), one weight", None, f"the autograd engine's cost of {len(tiny_params)} gradients")
    return rows


def breakdown(number: int = 200, rounds: int = 7) -> List[tuple]:
    """multi_penalty over the 20 tiny weights, part by part: (part, us).  The parts overlap (each
    is timed alone), so they are read against the total, not summed."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(SHAPE, generator=g).requires_grad_() for _ in range(N_WEIGHTS)]
    items = [(x, *SPEC) for x in ws]
    small = [x.detach() for x in ws]
    ops = torch.ops.projkernels_C
    op = ops.multi_penalty.default
    weights, key = pk.dispatch.multi_inputs.collect(items)
    a = pk.dispatch.multi.plan_for(key, "auto").call
    # The bound call's tables as Python objects, read once (each property read builds a new list).
    offsets, inv_stab, consts, geometry = a.offsets, a.inv_stab, a.consts, a.geometry
    ones, zeros = torch.ones(N_WEIGHTS), torch.zeros(N_WEIGHTS)
    kept = op(ws, offsets, inv_stab, consts, geometry)
    stacked = torch.stack(ws).square().sum()
    parts = {
        "multi_penalty fwd+bwd, total": lambda: torch.autograd.grad(pk.multi_penalty(items)[0], ws),
        "Python: collect(items), the cache key": lambda: pk.dispatch.multi_inputs.collect(items),
        "Python: plan_for(key), a cache hit": lambda: pk.dispatch.multi.plan_for(key, "auto"),
        "public op forward through torch.ops, no autograd node (weights detached)":
            lambda: op(small, offsets, inv_stab, consts, geometry),
        "public op forward, bound call, no autograd node (weights detached)": lambda: a(small),
        "public op forward through torch.ops, 1 weight, no autograd node":
            lambda: op(small[:1], offsets[:1], inv_stab[:1], consts[:, :1], geometry[:4]),
        "public op forward through torch.ops with its autograd node": lambda: op(ws, offsets, inv_stab, consts, geometry),
        "public op forward with its autograd node, bound call (what multi_penalty calls)": lambda: a(ws),
        "backward alone: torch.autograd.grad through the node (engine, node, kernel)":
            lambda: torch.autograd.grad(kept[0], ws, retain_graph=True),
        "native backward alone through stack(ws).square().sum() (one 20-output node)":
            lambda: torch.autograd.grad(stacked, ws, retain_graph=True),
        "raw multi_forward called from Python": lambda: ops.multi_forward(small, offsets, inv_stab, geometry),
        "raw multi_backward called from Python":
            lambda: ops.multi_backward(small, ones, zeros, offsets, inv_stab, geometry),
    }
    t = interleaved(parts, number, rounds)
    # The kernels' own rate, on one large weight of the same kind (per-call costs amortised away).
    big = torch.randn(256, 256, 3, 3, generator=g)
    b = pk.dispatch.multi.plan_for(pk.dispatch.multi_inputs.collect([(big, *SPEC)])[1], "auto").call
    b_offsets, b_inv_stab, b_geometry = b.offsets, b.inv_stab, b.geometry
    k = interleaved({
        "fwd": lambda: ops.multi_forward([big], b_offsets, b_inv_stab, b_geometry),
        "bwd": lambda: ops.multi_backward([big], ones[:1], zeros[:1], b_offsets, b_inv_stab, b_geometry),
    }, 3, 3)
    scale = N_WEIGHTS * ws[0].numel() / big.numel()
    rows = [(name, us) for name, us in t.items()]
    rows.append((f"kernel compute for the {N_WEIGHTS} weights at the large-weight rate, forward", k["fwd"] * scale))
    rows.append((f"kernel compute for the {N_WEIGHTS} weights at the large-weight rate, backward", k["bwd"] * scale))
    return rows


def breakdown_markdown(rows: List[tuple]) -> str:
    lines = [f"multi_penalty over {N_WEIGHTS} x {SHAPE} float32 ({SPEC[0]} regular), part by part:", "",
             "| part | us |", "|---|---:|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in rows]
    return "\n".join(lines)


def machine() -> str:
    from common import cpu_name
    return f"{cpu_name()}, {os.cpu_count()} cores visible, 1 thread used"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(rows: List[dict]) -> str:
    malloc = ("MALLOC_MMAP_THRESHOLD_=" + os.environ["MALLOC_MMAP_THRESHOLD_"]
              if "MALLOC_MMAP_THRESHOLD_" in os.environ else "glibc malloc defaults")
    lines = [f"Machine: {machine()}; torch {torch.__version__}; date "
             f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; commit {commit()}; "
             f"{malloc}; clock: {'thread CPU time' if CLOCK == 'thread' else 'wall time'}.",
             "", "| case | ours (us) | baseline | baseline (us) | ratio | target |",
             "|---|---:|---|---:|---:|---|"]
    for r in rows:
        target = "" if r["target"] is None else (f"<= {r['target']:g}x " + ("met" if r["ratio"] <= r["target"]
                                                                               else "not met"))
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['case']}{note} | {r['ours_us']:.1f} | {r['baseline']} | {r['baseline_us']:.1f} | "
                     f"{r['ratio']:.2f}x | {target} |")
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    import argparse
    ap = argparse.ArgumentParser(description="host cost of the public API vs native ops (CPU, 1 thread)")
    ap.add_argument("--number", type=int, default=2000, help="calls per timing of the single-weight cases")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the best is kept")
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread",
                    help="thread CPU time (default; robust on a shared machine) or wall time")
    ap.add_argument("--breakdown", action="store_true",
                    help="also print where multi_penalty's time goes (its parts timed one by one)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = args.clock
    rows = measure(args.number, args.rounds)
    print(markdown(rows))
    if args.breakdown:
        print()
        print(breakdown_markdown(breakdown(max(1, args.number // 10), args.rounds)))
    return rows


if __name__ == "__main__":
    main()
