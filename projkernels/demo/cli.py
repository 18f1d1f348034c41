"""The demo's command line: options, the plan of runs, and the order in which results are saved."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

import torch

from ..model import format_report
from .data import Task, make_data
from .metrics import equivariance_error, equivariant_floor
from .report import best_penalty_run, build_summary, sweep_text, write_summary
from .train import Progress, train_run

__all__ = ["parse_args", "main"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # Options whose default depends on --quick say so in their own help text.
        return action.help if action.default is None else super()._get_help_string(action)


_DESCRIPTION = """\
Train a small C4 G-CNN (plain nn.Conv2d layers) on a synthetic task whose rotation symmetry is
broken by a fixed directional term, in the data-limited regime (64 training fields of 12 x 12 by
default, 1024 test fields), with: no penalty, the projection penalty lambda * ||W - P(W)||^2 at
several lambdas, an exactly equivariant G-CNN (projected gradients), and a sample-based
regulariser.  Prints one table per breaking strength and writes a figure and a JSON summary.

What the table shows: with few examples the unpenalised CNN overfits (train error far below test
error); the exact G-CNN cannot overfit as much but cannot represent the non-rotating term either
(its test error sits above the 'exact-equivariance floor' plus its own fitting error); a moderate
lambda keeps most of the symmetry prior while still learning the breaking term, and in the default
run has the lowest test error (a U-shape in test error vs lambda; the last line of each table says
whether that happened).  The breaking=0 table (--compare-breaking) shows the other side: on an
exactly symmetric target the exact G-CNN is best.  With Adam, very
large lambdas (>= ~100 here) learn slowly; use projection for exact equivariance."""


def _floats(p, flag: str, text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag}: expected a comma list of numbers, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m projkernels.demo", description=_DESCRIPTION,
                                formatter_class=_HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smaller run (fewer steps and lambdas, no breaking comparison; about 10 s on 2 "
                        "idle CPU cores, the default run about 25 s)")
    p.add_argument("--breaking", type=float, default=0.3,
                   help="strength of the non-rotating term d/dx x in the target (0: exactly C4-equivariant)")
    p.add_argument("--compare-breaking", type=str, default=None,
                   help="comma list of further breaking strengths, each rerun without the sample-based "
                        "baseline and shown in its own table and test-error panel "
                        "(default 0; with --quick none; '' for none)")
    p.add_argument("--lambdas", type=str, default=None,
                   help="comma list of lambda_perp values for the penalty runs "
                        "(default 0.1,1,10,100; with --quick 0.3,100)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 400; --quick 300)")
    p.add_argument("--sample-weight", type=float, default=1.0,
                   help="mu of the sample-based regulariser mu * mean ||f(gx) - g f(x)||^2")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the projected and sample-based runs (penalty and no-penalty only)")
    p.add_argument("--train-size", type=int, default=64,
                   help="number of training fields (small on purpose: the data-limited regime)")
    p.add_argument("--test-size", type=int, default=1024, help="number of test fields")
    p.add_argument("--size", type=int, default=12, help="side of the square input fields")
    p.add_argument("--fields", type=int, default=4, help="regular fields per hidden layer (channels = 4 x this)")
    p.add_argument("--depth", type=int, default=2, help="number of regular -> regular group convs")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (cosine-decayed to 5%%)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimiser (sgd: momentum 0.9)")
    p.add_argument("--device", type=str, default="cpu", help="'cpu' or 'cuda' (if available)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initial weights and batches")
    p.add_argument("--out", type=str, default="demo_out", help="output folder for demo.png and summary.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; these convolutions are too small to gain from more, and extra "
                        "threads slow down badly when other processes share the cores (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 300 if args.quick else 400
    if args.lambdas is None:
        args.lambdas = "0.3,100" if args.quick else "0.1,1,10,100"
    if args.compare_breaking is None:
        args.compare_breaking = "" if args.quick else "0"
    args.lambda_list = _floats(p, "--lambdas", args.lambdas)
    if any(v <= 0 for v in args.lambda_list):
        p.error("--lambdas: values must be positive (the no-penalty run is always included)")
    args.breaking_list = [args.breaking] + [b for b in _floats(p, "--compare-breaking", args.compare_breaking)
                                            if b != args.breaking]
    if args.steps < 1:
        p.error("--steps: must be at least 1")
    if min(args.train_size, args.test_size) < 1:
        p.error("--train-size / --test-size: must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def _plan(args, main_sweep: bool) -> List[tuple]:
    plan = [("none", 0.0, "no penalty")]
    plan += [("penalty", lam, f"penalty lambda={lam:g}") for lam in args.lambda_list]
    plan += [("decay", lam, f"decay lambda={lam:g}") for lam in args.lambda_list]
    if not args.no_baselines:
        plan.append(("projected", 0.0, "projected (exact)"))
        if main_sweep:  # the sample-based run is the slowest; its point is runtime, made once
            plan.append(("sample", args.sample_weight, f"sample-based mu={args.sample_weight:g}"))
    return plan


def main(argv=None) -> dict:
    """Run the demo; returns the summary that is also written to ``<out>/summary.json``.

    Order matters: the tables and the JSON summary are written as soon as training ends, and the
    figure (the only part needing matplotlib) comes last, so a missing matplotlib or a failed plot
    costs the picture, never the results.
    """
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    plans = [_plan(args, i == 0) for i in range(len(args.breaking_list))]
    progress = Progress(sum(len(pl) for pl in plans) * args.steps, enabled=not args.no_progress)
    sweeps = []
    for breaking, plan in zip(args.breaking_list, plans):
        # Same seed for every breaking strength: identical inputs, initial weights and batches, so
        # the tables differ only through the target.
        torch.manual_seed(args.seed)
        task = Task(breaking, args.size, args.seed, args.device)
        data = make_data(task, args.train_size, args.test_size, args.size, args.seed, args.device)
        runs = [train_run(m, w, data, args, progress, label) for m, w, label in plan]
        sweeps.append({"breaking": breaking, "floor": equivariant_floor(task, data["x_test"], data["y_test"]),
                       "target_eq": equivariance_error(task, data["x_test"]), "runs": runs})
    progress.close()
    wall = time.perf_counter() - t_start

    summary_path = os.path.join(args.out, "summary.json")
    summary = build_summary(args, sweeps, wall)
    write_summary(summary, summary_path)
    print("\n\n".join(sweep_text(sw, args) for sw in sweeps))
    best = best_penalty_run(sweeps[0]["runs"])
    if best is not None:
        print(f"\nper-layer equivariance of the best penalised model ({best['label']}, "
              f"breaking={args.breaking:g}):")
        print(format_report(best["layers"]))
    sys.stdout.flush()

    fig_path = os.path.join(args.out, "demo.png")
    if _figure(sweeps, fig_path):
        summary["figure"] = fig_path
        write_summary(summary, summary_path)
        print(f"\nwrote {summary_path} and {fig_path} ({wall:.1f} s of training)")
    else:
        print(f"\nwrote {summary_path}; no figure ({wall:.1f} s of training)")
    return summary


def _figure(sweeps: List[dict], path: str) -> bool:
    """Draw the figure; on failure print why on stderr and return False (the results are already saved)."""
    runs = sweeps[0]["runs"]
    spectra_runs = [runs[0]] + sorted((r for r in runs if r["method"] == "penalty"), key=lambda r: r["weight"])
    try:
        from .plot import make_figure
        make_figure(sweeps, spectra_runs, path)
        return True
    except ImportError as err:
        from ..install_hints import extra_hint
        print(f"note: no figure: matplotlib is not importable ({err}); the tables above and summary.json "
              f"hold every result. To draw the figure: {extra_hint('demo', ['matplotlib'])}, then rerun.",
              file=sys.stderr)
    except Exception as err:  # a plotting failure must not cost the run: report it and go on
        print(f"note: the figure could not be drawn ({type(err).__name__}: {err}); the tables above and "
              "summary.json hold every result.", file=sys.stderr)
    return False
