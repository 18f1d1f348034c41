"""The demo's results as text (tables, verdict) and as the JSON summary."""
from __future__ import annotations

import json
import os
from typing import List, Optional

__all__ = ["format_table", "verdict", "sweep_text", "build_summary", "write_summary"]

METRICS = {
    "test_error": "sum ||f(x)-y||^2 / sum ||y||^2 over the test set",
    "train_error": "the same over the training set",
    "equivariance_error": "mean over test x and all 4 rotations g (identity included) of ||f(gx) - g f(x)|| / ||f(x)||",
    "regulariser_share": "time of the regulariser's extra forward+backward (or projection) / time of the whole "
                         "step, first steps excluded",
}


def format_table(runs: List[dict], floor: float, target_eq: float) -> str:
    head = ["run", "test err", "train err", "eq. err", "ms/step", "reg ms/step", "reg share"]
    body = []
    for r in runs:
        reg = r["method"] != "none"
        body.append([r["label"], f"{r['test_error']:.4f}", f"{r['train_error']:.4f}",
                     f"{r['equivariance_error']:.2e}", f"{r['ms_per_step']:.2f}",
                     f"{r['regulariser_ms_per_step']:.2f}" if reg else "-",
                     f"{100 * r['regulariser_share']:.1f}%" if reg else "-"])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(row) for row in body]
    lines.append(f"reference: the target's own equivariance error {target_eq:.2e}; test error of the best "
                 f"exactly equivariant map (symmetrised target) {floor:.4f}")
    return "\n".join(lines)


def verdict(runs: List[dict]) -> str:
    """One line saying which run generalised best and whether a penalised run beat both extremes."""
    by = {r["method"]: r for r in runs if r["method"] in ("none", "projected")}
    pen = [r for r in runs if r["method"] == "penalty"]
    best = min(runs, key=lambda r: r["test_error"])
    line = f"lowest test error: {best['label']} ({best['test_error']:.4f})"
    if pen and "none" in by and "projected" in by:
        bp = min(pen, key=lambda r: r["test_error"])
        beats = bp["test_error"] < min(by["none"]["test_error"], by["projected"]["test_error"])
        line += (f"; best {bp['label']} ({bp['test_error']:.4f}) "
                 f"{'beats' if beats else 'does not beat'} both no penalty ({by['none']['test_error']:.4f}) "
                 f"and projected ({by['projected']['test_error']:.4f})")
    dec = [r for r in runs if r["method"] == "decay"]
    if pen and dec:
        bp, bd = (min(rs, key=lambda r: r["test_error"]) for rs in (pen, dec))
        line += (f"; best decay row {bd['label']} ({bd['test_error']:.4f}, {bd['regulariser_ms_per_step']:.2f} ms/step) "
                 f"vs best penalty row ({bp['test_error']:.4f}, {bp['regulariser_ms_per_step']:.2f} ms/step)")
    return line


def sweep_text(sweep: dict, args) -> str:
    """The header, table and verdict of one breaking strength."""
    return (f"breaking={sweep['breaking']:g} ({args.train_size} training fields of {args.size}x{args.size}, "
            f"{args.test_size} test fields, {args.steps} steps)\n"
            + format_table(sweep["runs"], sweep["floor"], sweep["target_eq"]) + "\n" + verdict(sweep["runs"]))


def best_penalty_run(runs: List[dict]) -> Optional[dict]:
    pen = [r for r in runs if r["method"] == "penalty"]
    return min(pen, key=lambda r: r["test_error"]) if pen else None


def build_summary(args, sweeps: List[dict], wall_seconds: float, figure: Optional[str] = None) -> dict:
    """Everything the run measured, JSON-ready; ``runs`` are those of the first breaking strength."""
    main = sweeps[0]
    best = best_penalty_run(main["runs"])
    config = {k: v for k, v in vars(args).items() if k not in ("lambda_list", "breaking_list")}
    config.update({"lambdas": args.lambda_list, "breakings": args.breaking_list})
    return {
        "config": config,
        "task": {"breaking": main["breaking"], "target_equivariance_error": main["target_eq"],
                 "equivariant_floor_test_error": main["floor"]},
        "metrics": dict(METRICS),
        "runs": main["runs"],
        "best_penalty_lambda": best["weight"] if best else None,
        "breaking_sweep": [{"breaking": sw["breaking"], "target_equivariance_error": sw["target_eq"],
                            "equivariant_floor_test_error": sw["floor"], "verdict": verdict(sw["runs"]),
                            "runs": sw["runs"]} for sw in sweeps],
        "figure": figure,
        "wall_seconds": wall_seconds,
    }


def write_summary(summary: dict, path: str) -> None:
    """Write atomically (a temporary file renamed into place), so a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=2)
    os.replace(tmp, path)
