"""The demo's figure: test and equivariance error against lambda, and per-layer spectra.

Needs matplotlib (the ``demo`` extra installs it); the demo calls
this last, after the tables and the JSON summary are out, and carries on without a figure when
matplotlib is missing or drawing fails.
"""
from __future__ import annotations

from typing import List

__all__ = ["make_figure"]


def make_figure(sweeps: List[dict], spectra_runs: List[dict], path: str) -> None:
    """One test-error panel per breaking strength, then the equivariance error and the per-layer
    spectra of the main (first) breaking strength."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"none": ("no penalty", "tab:gray", "--"), "projected": ("projected (exact)", "tab:green", "-."),
              "sample": ("sample-based", "tab:red", ":")}
    panels = [("test_error", sw) for sw in sweeps] + [("equivariance_error", sweeps[0])]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(6 * (len(panels) + 1), 4.4))
    for ax, (key, sw) in zip(axes, panels):
        runs = sw["runs"]
        other = {r["method"]: r for r in runs if r["method"] not in ("penalty", "decay")}
        for method, color, label in (("penalty", "tab:blue", "projection penalty"),
                                     ("decay", "tab:orange", "equivariance decay (decoupled)")):
            sweep = sorted((r for r in runs if r["method"] == method), key=lambda r: r["weight"])
            if sweep:
                ax.plot([r["weight"] for r in sweep], [r[key] for r in sweep], "o-", color=color, label=label)
        for m, (name, color, ls) in styles.items():
            if m in other:
                ax.axhline(other[m][key], color=color, ls=ls, label=name)
        if key == "test_error":
            ax.axhline(sw["floor"], color="black", lw=0.8, ls=(0, (1, 3)), label="exact-equivariance floor")
            title = f"test error  ||f(x)-y||² / ||y||²   (breaking={sw['breaking']:g})"
        else:
            ax.axhline(sw["target_eq"], color="black", lw=0.8, ls=(0, (1, 3)), label="target's own")
            ax.set_yscale("log")
            title = f"equivariance error  ||f(gx)-g f(x)|| / ||f(x)||   (breaking={sw['breaking']:g})"
        ax.set_xscale("log")
        ax.set_xlabel("lambda_perp")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[-1]
    if spectra_runs:
        # Bars: the isotypic energies of one model (the first), per layer, as shares of ||W||^2 on a
        # log axis (irrep 0 is the equivariant part).  Markers: the non-equivariant share
        # ||W - P(W)||^2 / ||W||^2 of the other models, to show how lambda moves it.
        base = spectra_runs[0]
        layers = [l["name"] for l in base["layers"]]
        irreps = list(base["layers"][0]["spectrum"])
        bw = 0.8 / len(irreps)
        colors = plt.cm.viridis([i / max(len(irreps) - 1, 1) for i in range(len(irreps))])
        share = lambda l, k: l["spectrum"][k] / (sum(l["spectrum"].values()) or 1.0)
        for i, irrep in enumerate(irreps):
            xs = [p + (i - (len(irreps) - 1) / 2) * bw for p in range(len(layers))]
            ax.bar(xs, [max(share(l, irrep), 1e-16) for l in base["layers"]], bw * 0.95, color=colors[i],
                   label=f"irrep {irrep} ({base['label']})")
        for run, marker in zip(spectra_runs[1:], "ovs^D<>ph*"):
            ax.plot(range(len(layers)), [max(1 - share(l, irreps[0]), 1e-16) for l in run["layers"]],
                    marker=marker, ls="-", lw=0.8, color="black", ms=5, label=f"non-eq. share, {run['label']}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers)
        ax.set_ylabel("share of ||W||²")
        ax.set_title(f"per-layer C4 spectra (isotypic energies, breaking={sweeps[0]['breaking']:g})", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
