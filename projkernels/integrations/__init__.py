"""Where training is watched: Lightning, TensorBoard and matplotlib.

Each integration lives in its own module and imports its framework only when that module is
imported, so ``import projkernels`` never needs any of them:

- ``projkernels.integrations.lightning``: ``EquivarianceCallback``, the penalty (or the decoupled
  decay) for the attached layers of a LightningModule, and the per-layer report in the trainer's
  loggers (extra ``lightning``).
- ``projkernels.integrations.tensorboard``: ``write_report``, the report as scalars and spectra in a
  ``SummaryWriter`` (extra ``tensorboard``).
- ``projkernels.integrations.plotting``: ``plot_spectra``, the per-layer spectra of any model as a
  matplotlib figure (extra ``demo``).

``report_metrics`` (here) flattens a report into ``{tag: number}`` for any other logger.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

import torch
from torch import nn

__all__ = ["report_metrics", "as_report"]


def as_report(model_or_report: Union[nn.Module, List[dict]]) -> List[dict]:
    """The rows of ``projkernels.equivariance_report`` for a model, or ``model_or_report`` itself when it
    already is such a list (so a report computed once can go to several loggers)."""
    import projkernels as pk
    if isinstance(model_or_report, nn.Module):
        return pk.equivariance_report(model_or_report)
    if isinstance(model_or_report, (list, tuple)) and all(isinstance(r, dict) for r in model_or_report):
        return list(model_or_report)
    raise TypeError("model_or_report: expected an nn.Module with attached layers or the list that "
                    f"projkernels.equivariance_report returns, got {type(model_or_report).__name__}")


def _tag(name: str) -> str:
    # Loggers split tags on "/": a layer's module path keeps its dots.
    return name.replace("/", "_")


def report_metrics(model_or_report: Union[nn.Module, List[dict]], prefix: str = "equivariance",
                   spectrum: bool = True) -> Dict[str, float]:
    """``{tag: value}`` for every attached layer: ``{prefix}/{layer}/relative`` (``||W - P(W)|| / ||W||``),
    ``/penalty`` (``||W - P(W)||^2``), ``/bias_relative`` (layers with an equivariant bias form) and, with
    ``spectrum=True``, ``/spectrum/{irrep}``: each irrep's share of ``||W||^2`` (entry 0 is the
    equivariant share; a steerable layer has the two shares ``equivariant`` and ``non-equivariant``).
    ``{prefix}/penalty`` is the sum of the layers' weight penalties.  NaN stays NaN (a diverged layer
    must not read as equivariant)."""
    rows = as_report(model_or_report)
    out: Dict[str, float] = {}
    total = 0.0
    for r in rows:
        base = f"{prefix}/{_tag(r['name'])}"
        out[f"{base}/relative"] = float(r["relative"])
        out[f"{base}/penalty"] = float(r["penalty"])
        total += float(r["penalty"])
        if r.get("bias_relative") is not None:
            out[f"{base}/bias_relative"] = float(r["bias_relative"])
        if spectrum:
            energy = sum(r["spectrum"].values())
            for irrep, e in r["spectrum"].items():
                out[f"{base}/spectrum/{_tag(str(irrep))}"] = float(e) / energy if energy > 0 else (
                    math.nan if not math.isfinite(energy) else 0.0)
    out[f"{prefix}/penalty"] = total
    return out
