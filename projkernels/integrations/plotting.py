"""The per-layer spectra of any model as a matplotlib figure (the demo's spectrum panel, for any model).

Needs matplotlib (extra ``demo``)."""
from __future__ import annotations

from typing import List, Optional, Union

from torch import nn

from . import as_report

__all__ = ["plot_spectra"]


def plot_spectra(model_or_report: Union[nn.Module, List[dict]], ax=None, *, path: Optional[str] = None,
                 title: Optional[str] = None, floor: float = 1e-16):
    """Bars of each attached layer's isotypic energies as shares of ``||W||^2``, on a log axis.

    One group of bars per layer (module order), one bar per irrep of that layer's group, coloured by
    irrep name across layers; irrep 0 (``"0"`` / ``irrep_0``...) is the equivariant share, the others
    add up to ``||W - P(W)||^2 / ||W||^2``.  Steerable layers show their two shares (equivariant,
    non-equivariant).  Shares below ``floor`` are drawn at ``floor`` (a log axis has no zero).

    ``ax``: draw into this axes (else a new figure); ``path``: also save the figure there.
    Returns the matplotlib ``Figure``."""
    try:
        import matplotlib
    except ImportError as exc:
        from ..install_hints import extra_hint
        raise ImportError(f"plot_spectra needs matplotlib: {extra_hint('demo', ['matplotlib'])}") from exc
    if ax is None:
        import matplotlib.pyplot as plt
        rows = as_report(model_or_report)
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2.5), 3.6))
    else:
        rows = as_report(model_or_report)
        fig = ax.figure
    if not rows:
        raise ValueError("model_or_report: the report has no layer (attach symmetries first)")
    names: List[str] = []
    for r in rows:
        names += [k for k in r["spectrum"] if k not in names]
    cmap = matplotlib.colormaps["viridis"]
    colors = {k: cmap(i / max(len(names) - 1, 1)) for i, k in enumerate(names)}
    labelled = set()
    for x, r in enumerate(rows):
        spec = r["spectrum"]
        total = sum(spec.values())
        width = 0.8 / len(spec)
        for i, (k, e) in enumerate(spec.items()):
            share = e / total if total > 0 else 0.0
            ax.bar(x + (i - (len(spec) - 1) / 2) * width, max(share, floor), width * 0.95, color=colors[k],
                   label=None if k in labelled else f"irrep {k}")
            labelled.add(k)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=30 if len(rows) > 6 else 0)
    ax.set_ylabel("share of ||W||²")
    ax.set_title(title or "per-layer spectra (isotypic energies)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig
