"""The equivariance report in TensorBoard: one call per logging step, for plain training loops.

    from torch.utils.tensorboard import SummaryWriter
    from projkernels.integrations.tensorboard import write_report

    writer = SummaryWriter("runs/exp")
    ...
    if step % 100 == 0:
        write_report(writer, model, step)

Needs the ``tensorboard`` package (extra ``tensorboard``); ``torch.utils.tensorboard`` is torch's writer.
"""
from __future__ import annotations

from typing import List, Union

from torch import nn

from . import as_report, report_metrics, _tag

__all__ = ["write_report", "write_spectrum_histograms"]


def write_report(writer, model_or_report: Union[nn.Module, List[dict]], step: int, *,
                 prefix: str = "equivariance", spectrum: str = "histogram") -> List[dict]:
    """Write the equivariance report of ``model_or_report`` to ``writer`` (a ``SummaryWriter``) at ``step``.

    Scalars: the tags of ``projkernels.integrations.report_metrics`` (per layer ``relative``,
    ``penalty``, ``bias_relative``, and the total ``{prefix}/penalty``; the per-irrep shares are
    scalars too).  The spectrum of each layer is also written as ``{prefix}/{layer}/spectrum``:

    - ``spectrum="histogram"`` (default): a histogram whose bucket ``i`` is irrep ``i``'s share of
      ``||W||^2`` (TensorBoard's Histograms / Distributions tabs; no matplotlib needed);
    - ``spectrum="figure"``: one bar figure of every layer's spectrum (``plot_spectra``; needs matplotlib),
      under ``{prefix}/spectra``;
    - ``spectrum="none"``: scalars only.

    Returns the report rows written, so a caller can print them too (``projkernels.format_report``).
    For an FSDP2-sharded model every rank must call it (the report is a collective); write from rank 0.
    """
    if spectrum not in ("histogram", "figure", "none"):
        raise ValueError(f"spectrum: expected 'histogram', 'figure' or 'none', got {spectrum!r}")
    if not hasattr(writer, "add_scalar"):
        raise TypeError("writer: expected a torch.utils.tensorboard.SummaryWriter (or an object with its "
                        f"add_scalar / add_histogram_raw methods), got {type(writer).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected a non-negative int, got {step!r}")
    rows = as_report(model_or_report)
    for tag, value in report_metrics(rows, prefix=prefix, spectrum=True).items():
        writer.add_scalar(tag, value, global_step=step)
    if spectrum == "histogram":
        write_spectrum_histograms(writer, rows, step, prefix=prefix)
    elif spectrum == "figure":
        from .plotting import plot_spectra
        fig = plot_spectra(rows)
        writer.add_figure(f"{prefix}/spectra", fig, global_step=step, close=True)
    writer.flush()
    return rows


def write_spectrum_histograms(writer, rows: List[dict], step: int, *, prefix: str = "equivariance") -> None:
    """Each layer's spectrum as the histogram ``{prefix}/{layer}/spectrum``: bucket ``i`` (right edge ``i``)
    holds irrep ``i``'s share of ``||W||^2``."""
    for r in rows:
        shares = _shares(r)
        n = len(shares)
        writer.add_histogram_raw(
            f"{prefix}/{_tag(r['name'])}/spectrum", min=0.0, max=float(n - 1), num=float(sum(shares)) or 1.0,
            sum=float(sum(i * s for i, s in enumerate(shares))),
            sum_squares=float(sum(i * i * s for i, s in enumerate(shares))),
            bucket_limits=[float(i) for i in range(n)], bucket_counts=shares, global_step=step)


def _shares(row: dict) -> List[float]:
    energies = [float(v) for v in row["spectrum"].values()]
    total = sum(energies)
    return [e / total if total > 0 else 0.0 for e in energies]
