"""The smoke benchmark's command line: options, the plan of runs, the choice on validation, the outputs."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List

import torch

from ..backends.registry import available_backends
from ..demo.train import Progress
from ..install_hints import escnn_hint
from . import symmetry as sym
from .data import SmokeConfig, load_or_generate, make_splits
from .report import (METRICS, aggregate, crossings, format_size_sweep, format_sweep, format_table,
                     select_on_validation, write_summary)
from .train import train_run

__all__ = ["parse_args", "main", "PRESETS", "ROUTES"]

# Every route, in the order of the tables.
ROUTES = ("none", "projected", "penalty", "decay", "rpp", "relaxed", "sample", "so2")

_DESCRIPTION = """\
Compare approximate-equivariance routes on 2-D smoke plumes simulated with PhiFlow (buoyancy whose
magnitude depends on its direction breaks rotation symmetry by --breaking): predict the next
velocity frame from the last few.  Routes, all on one plain nn.Conv2d backbone with velocity declared
as C4 vector fields: unconstrained CNN, exact C4 CNN (projected), projection penalty and equivariance
decay (lambda chosen on the validation split), residual pathway prior, relaxed group convolution,
a sample-based regulariser and, with escnn installed, the penalty towards escnn's SO(2)-steerable
span (velocity as frequency-1 fields, hidden channels as scalars).  Reports RMSE on the 'future' and 'domain' splits (mean ± std over
seeds), equivariance error, parameters and time per step; writes summary.json and smoke.png, and a
data-size sweep (1/4, 1/2, all training simulations)."""

# Data and training presets; any explicit option overrides them.
PRESETS = {
    "default": dict(size=32, frames=40, warmup=8, split=28, train_sims=8, val_sims=2, domain_sims=4,
                    history=3, steps=200, batch=8, fields=4, depth=4, seeds=3,
                    lambdas="0.1,1,10", rpp_weights="0.01", relaxed_weights="0.1", sample_weights="1",
                    so2_lambdas="0.01,0.1,1"),
    "full": dict(size=64, frames=80, warmup=16, split=56, train_sims=24, val_sims=4, domain_sims=8,
                 history=3, steps=3000, batch=32, fields=8, depth=5, seeds=3,
                 lambdas="0.001,0.01,0.1,1,10", rpp_weights="0.0001,0.001,0.1", relaxed_weights="0.01,0.1,1",
                 sample_weights="0.1,1", so2_lambdas="0.001,0.01,0.1,1"),
    "tiny": dict(size=16, frames=10, warmup=2, split=6, train_sims=4, val_sims=1, domain_sims=2,
                 history=2, steps=12, batch=8, fields=2, depth=3, seeds=3,
                 lambdas="0.1,10", rpp_weights="0.1", relaxed_weights="1", sample_weights="1",
                 so2_lambdas="0.1"),
}


def _floats(p, flag: str, text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = None
    if not vals or any(v <= 0 for v in vals):
        p.error(f"{flag}: expected a comma list of positive numbers, got {text!r}")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m projkernels.bench_smoke", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="a few frames of 16x16 and a few steps (CI; under a minute)")
    size.add_argument("--full", action="store_true",
                      help="the published 64x64 resolution, more simulations and steps (for a GPU: --device cuda)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per run (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 200; --full 3000)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; --full 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, cosine-decayed to 5%%")
    p.add_argument("--fields", type=int, default=None, help="regular C4 fields per hidden layer (channels = 4 x this)")
    p.add_argument("--depth", type=int, default=None, help="number of convs")
    p.add_argument("--history", type=int, default=None, help="input frames")
    p.add_argument("--banks", type=int, default=2, help="filter banks of the relaxed group convolution")
    p.add_argument("--mode", choices=("auto", "vector", "lifted"), default="auto",
                   help="how velocity is declared: 'vector' fields, or lifted to regular fields where the "
                        "'vector' field type is not available (auto: vector when available)")
    p.add_argument("--breaking", type=float, default=0.5,
                   help="buoyancy magnitude b0 (1 + breaking cos(direction angle)); 0 = exactly C4-symmetric data")
    p.add_argument("--lambdas", default=None, help="lambda grid of the penalty and the decay")
    p.add_argument("--rpp-weights", default=None, help="grid of RPP's free-path L2 prior weight")
    p.add_argument("--rpp-eq-l2", type=float, default=1e-5, help="RPP's (fixed) L2 prior weight on the equivariant path")
    p.add_argument("--relaxed-weights", default=None, help="grid of the relaxed conv's relaxation regulariser weight")
    p.add_argument("--sample-weights", default=None, help="grid of mu of the sample-based regulariser")
    p.add_argument("--so2-lambdas", default=None, help="lambda grid of the SO(2)-span penalty (needs escnn)")
    p.add_argument("--methods", default="all",
                   help="comma list of routes to run, from " + ", ".join(ROUTES) + " ('all': every route "
                        "available; so2 needs escnn and the 'vector' declaration)")
    p.add_argument("--sweep-fractions", default="0.25,0.5",
                   help="training-set fractions of the data-size sweep besides all ('' for no sweep)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the simulations")
    p.add_argument("--cache-dir", default=None,
                   help="where simulated data are cached (default $PROJKERNELS_CACHE/smoke or ~/.cache/projkernels/smoke; "
                        "'' for no cache)")
    p.add_argument("--out", default="smoke_out", help="output folder for summary.json and smoke.png")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    args.preset = "tiny" if args.tiny else "full" if args.full else "default"
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds / --steps: must be at least 1")
    if not 0 <= args.breaking < 1:
        p.error(f"--breaking: expected 0 <= breaking < 1, got {args.breaking}")
    args.grids = {"penalty": _floats(p, "--lambdas", args.lambdas), "decay": _floats(p, "--lambdas", args.lambdas),
                  "rpp": _floats(p, "--rpp-weights", args.rpp_weights),
                  "relaxed": _floats(p, "--relaxed-weights", args.relaxed_weights),
                  "sample": _floats(p, "--sample-weights", args.sample_weights),
                  "so2": _floats(p, "--so2-lambdas", args.so2_lambdas)}
    args.fractions = [] if not args.sweep_fractions.strip() else _floats(p, "--sweep-fractions", args.sweep_fractions)
    if any(f >= 1 for f in args.fractions):
        p.error("--sweep-fractions: fractions must be below 1 (all the data is always run)")
    if args.cache_dir is None:
        root = os.environ.get("PROJKERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "projkernels")
        args.cache_dir = os.path.join(root, "smoke")
    try:
        args.mode = sym.declaration(args.mode)
    except ValueError as err:
        p.error(f"--mode: {err}")
    args.methods, args.skipped = _methods(p, args)
    return args


def _so2_unavailable(args) -> str:
    """Why the SO(2)-span route cannot run here ('' when it can)."""
    if not sym.so2_available():
        return f"escnn is not installed ({escnn_hint()})"
    if args.mode != "vector":
        return "velocity is declared as lifted regular fields, which have no SO(2) counterpart"
    return ""


def _methods(p, args):
    """The routes to run and, for each available route left out, why (printed with the results)."""
    why = _so2_unavailable(args)
    if args.methods.strip() == "all":
        return [m for m in ROUTES if not (m == "so2" and why)], ({"so2": why} if why else {})
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in ROUTES]
    if bad or not chosen:
        p.error(f"--methods: expected a comma list from {', '.join(ROUTES)} or 'all', got {args.methods!r}")
    if "so2" in chosen and why:
        p.error(f"--methods: so2 cannot run: {why}")
    return chosen, {}


_NAMES = {"none": "unconstrained CNN", "projected": "exact C4 (projected)", "penalty": "penalty lambda={w:g}",
          "decay": "decay lambda={w:g}", "rpp": "RPP free-L2={w:g}", "relaxed": "relaxed conv alpha={w:g}",
          "sample": "sample-based mu={w:g}", "so2": "SO(2)-span penalty lambda={w:g}"}


def _plan(args) -> List[tuple]:
    plan = []
    for method in ROUTES:
        if method in args.methods:
            plan += [(method, 0.0)] if method in ("none", "projected") else [(method, w) for w in args.grids[method]]
    return plan


def data_config(args) -> SmokeConfig:
    return SmokeConfig(size=args.size, frames=args.frames, warmup=args.warmup, split=args.split,
                       train_sims=args.train_sims, val_sims=args.val_sims, domain_sims=args.domain_sims,
                       breaking=args.breaking, seed=args.data_seed).check()


def main(argv=None) -> dict:
    """Run the benchmark; returns the summary also written to ``<out>/summary.json``.  Tables and JSON are
    written before the figure (the only part needing matplotlib)."""
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cfg = data_config(args)
    sim_progress = Progress(cfg.warmup + cfg.frames, enabled=not args.no_progress)
    data = load_or_generate(cfg, args.cache_dir or None, sim_progress,
                            log=lambda m: print(m, file=sys.stderr))
    sim_progress.close()
    splits = make_splits(data, cfg, args.history, device=args.device)
    print(f"velocity declared as {sym.GROUP} '{sym.VELOCITY}' fields ({args.mode}: "
          + ("2 channels per frame" if args.mode == "vector" else "each frame lifted to one regular field")
          + f"), hidden '{sym.HIDDEN}'; samples: " + ", ".join(f"{s} {len(splits[s]['x'])}" for s in
                                                              ("train", "validation", "future", "domain")),
          file=sys.stderr)

    plan = _plan(args)
    for method, why in args.skipped.items():
        print(f"note: route {method} is left out: {why}", file=sys.stderr)
    n_sweep = len(args.fractions) * len([m for m in ("none", "projected", "penalty") if m in args.methods]) * args.seeds
    progress = Progress((len(plan) * args.seeds + n_sweep) * args.steps, enabled=not args.no_progress)
    keep = {}
    runs = []
    for method, w in plan:
        for s in range(args.seeds):
            row = train_run(method, w, splits, args, s, progress, _NAMES[method].format(w=w), keep=keep)
            runs.append(row)
    rows = aggregate(runs)
    selected = select_on_validation(rows)

    # Data-size sweep: unconstrained, exact, and the penalty at the lambda chosen on validation with
    # all the data (not re-tuned per size: that would need a grid per size).
    best = {r["method"]: r for r in selected}
    sweep_routes = [(m, best[m]["weight"]) for m in ("none", "projected", "penalty") if m in best]
    size_points = [dict(r, train_sims=cfg.train_sims, fraction=1.0) for r in rows
                   if (r["method"], r["weight"]) in sweep_routes]
    for frac in args.fractions:
        sub = make_splits(data, cfg, args.history, train_fraction=frac, device=args.device)
        n = int(sub["train"]["frames"][:, 0].unique().numel())
        sub_runs = [train_run(m, w, sub, args, s, progress, _NAMES[m].format(w=w))
                    for m, w in sweep_routes for s in range(args.seeds)]
        size_points += [dict(r, train_sims=n, fraction=frac) for r in aggregate(sub_runs)]
    progress.close()
    wall = time.perf_counter() - t_start

    summary = {
        "config": {k: v for k, v in vars(args).items() if k not in ("grids", "fractions", "skipped")},
        "grids": args.grids, "fractions": args.fractions, "skipped_routes": args.skipped,
        "data": {"config": dataclasses.asdict(cfg), "cache_hit": bool(data["cache_hit"]),
                 "cache_path": data["cache_path"], "scale": splits["scale"],
                 "samples": {s: len(splits[s]["x"]) for s in ("train", "validation", "future", "domain")},
                 "simulations": {s: sorted(set(splits[s]["frames"][:, 0].tolist()))
                                 for s in ("train", "validation", "future", "domain")}},
        "environment": {"torch": torch.__version__, "projkernels_backends": available_backends(args.device),
                        "threads": torch.get_num_threads()},
        "symmetry": {"group": sym.GROUP, "velocity": sym.VELOCITY, "hidden": sym.HIDDEN, "declared_as": args.mode,
                     "so2_route": None if "so2" not in args.methods else
                     "rot2dOnR2(-1): velocity irrep(1), hidden trivial_repr (escnn's sampled span)"},
        "metrics": dict(METRICS),
        "selected": selected, "rows": rows, "runs": runs, "size_sweep": size_points,
        "crossings": crossings(size_points) if args.fractions else [],
        "figure": None, "wall_seconds": wall,
    }
    path = os.path.join(args.out, "summary.json")
    write_summary(summary, path)
    print(_text(args, cfg, summary))
    sys.stdout.flush()
    fig = os.path.join(args.out, "smoke.png")
    try:
        from .plot import make_figure
        make_figure(summary, keep, splits, fig)
        summary["figure"] = fig
        write_summary(summary, path)
        print(f"\nwrote {path} and {fig} ({wall:.1f} s)")
    except ImportError as err:
        print(f"note: no figure: matplotlib is not importable ({err}); summary.json holds every result",
              file=sys.stderr)
        print(f"\nwrote {path} ({wall:.1f} s)")
    except Exception as err:  # a plotting failure must not cost the results, which are saved already
        print(f"note: the figure could not be drawn ({type(err).__name__}: {err})", file=sys.stderr)
        print(f"\nwrote {path} ({wall:.1f} s)")
    return summary


def _text(args, cfg: SmokeConfig, s: dict) -> str:
    parts = [f"smoke plumes {cfg.size}x{cfg.size}, breaking={cfg.breaking:g}, {cfg.train_sims} training simulations, "
             f"{args.steps} steps, {args.seeds} seeds (mean ± std), device {args.device}, velocity as "
             f"{args.mode} fields",
             format_table(s["selected"]),
             *[f"(route {m} left out: {why})" for m, why in s["skipped_routes"].items()],
             "\nevery weight (choice by validation RMSE only):",
             format_sweep(sorted(s["rows"], key=lambda r: (r["method"], r["weight"])))]
    if s["size_sweep"] and args.fractions:
        parts += ["\ndata-size sweep:", format_size_sweep(sorted(s["size_sweep"], key=lambda p: (p["train_sims"],
                                                                                                  p["label"]))),
                  *s["crossings"]]
    return "\n".join(parts)
