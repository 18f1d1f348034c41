"""The benchmark's results as text (tables) and as the JSON summary: aggregation over seeds and the
choice of each route's weight on the validation split."""
from __future__ import annotations

import json
import math
import os
from statistics import mean, pstdev
from typing import Dict, List

__all__ = ["aggregate", "select_on_validation", "format_table", "format_sweep", "format_size_sweep",
           "write_summary", "METRICS", "SCORES"]

SCORES = ("train_rmse", "validation_rmse", "future_rmse", "domain_rmse", "equivariance_error",
          "ms_per_step", "regulariser_ms_per_step", "regulariser_share")

METRICS = {
    "future_rmse": "RMSE of the next velocity frame on the training simulations' later frames (velocity units)",
    "domain_rmse": "RMSE on simulations with inflow positions not seen in training",
    "validation_rmse": "RMSE on held-out simulations of the training distribution; the only split used to "
                       "choose a weight (lambda, prior or regulariser weight)",
    "equivariance_error": "mean over future-split inputs and all 4 quarter turns g (identity included) of "
                          "||f(gx) - g f(x)|| / ||f(x)||, g acting on velocity as a C4 vector field",
    "ms_per_step": "wall time of a training step (forward, backward, regulariser, optimizer), first steps excluded",
    "regulariser_share": "time of the regulariser's extra work / time of the whole step",
    "std": "population standard deviation over seeds",
}


def aggregate(runs: List[dict]) -> List[dict]:
    """One row per (method, weight): mean and std over seeds of every score."""
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["weight"]), []).append(r)
    rows = []
    for (method, weight), rs in groups.items():
        row = {"method": method, "weight": weight, "label": rs[0]["label"], "seeds": [r["seed"] for r in rs],
               "parameters": rs[0]["parameters"]}
        for k in SCORES:
            vals = [r[k] for r in rs]
            row[k], row[k + "_std"] = mean(vals), (pstdev(vals) if len(vals) > 1 else 0.0)
        rows.append(row)
    return rows


def select_on_validation(rows: List[dict]) -> List[dict]:
    """Per method the row with the lowest mean validation RMSE (test splits play no part)."""
    best: Dict[str, dict] = {}
    for r in rows:
        if r["method"] not in best or r["validation_rmse"] < best[r["method"]]["validation_rmse"]:
            best[r["method"]] = r
    return list(best.values())


def _table(head: List[str], body: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def _pm(r: dict, k: str) -> str:
    return f"{r[k]:.4f} ± {r[k + '_std']:.4f}"


def format_table(selected: List[dict]) -> str:
    head = ["route (weight chosen on validation)", "future RMSE", "domain RMSE", "valid. RMSE", "eq. err",
            "params", "ms/step", "reg share"]
    body = [[r["label"], _pm(r, "future_rmse"), _pm(r, "domain_rmse"), f"{r['validation_rmse']:.4f}",
             f"{r['equivariance_error']:.2e}", str(r["parameters"]), f"{r['ms_per_step']:.2f}",
             "-" if r["method"] == "none" else f"{100 * r['regulariser_share']:.1f}%"] for r in selected]
    return _table(head, body)


def format_sweep(rows: List[dict]) -> str:
    head = ["run", "valid. RMSE", "future RMSE", "domain RMSE", "eq. err"]
    body = [[r["label"], f"{r['validation_rmse']:.4f}", f"{r['future_rmse']:.4f}", f"{r['domain_rmse']:.4f}",
             f"{r['equivariance_error']:.2e}"] for r in rows]
    return _table(head, body)


def format_size_sweep(points: List[dict]) -> str:
    head = ["train sims", "route", "future RMSE", "domain RMSE", "eq. err"]
    body = [[str(p["train_sims"]), p["label"], _pm(p, "future_rmse"), _pm(p, "domain_rmse"),
             f"{p['equivariance_error']:.2e}"] for p in points]
    return _table(head, body)


def crossings(points: List[dict], key: str = "future_rmse") -> List[str]:
    """Per training-set size, the best route; a line wherever the winner changes between sizes."""
    sizes = sorted({p["train_sims"] for p in points})
    winners = [min((p for p in points if p["train_sims"] == n), key=lambda p: p[key]) for n in sizes]
    lines = [f"{n} training simulations: lowest {key} {w['label']} ({w[key]:.4f})" for n, w in zip(sizes, winners)]
    return lines


def finite_or_none(x, where: str = "summary", bad: List[str] = None):
    """A copy with every non-finite float replaced by None (JSON has no NaN); ``bad`` collects where."""
    if isinstance(x, float) and not math.isfinite(x):
        if bad is not None:
            bad.append(where)
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v, f"{where}.{k}", bad) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_none(v, f"{where}[{i}]", bad) for i, v in enumerate(x)]
    return x


def write_summary(summary: dict, path: str) -> None:
    """Atomically (a temporary file renamed into place).  A non-finite number (a diverged run) is written
    as null and its place listed under ``non_finite``, so the file stays valid JSON."""
    bad: List[str] = []
    clean = finite_or_none(summary, "summary", bad)
    clean["non_finite"] = bad
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(clean, fh, indent=2)
    os.replace(tmp, path)
