"""The smoke benchmark's figure: RMSE against lambda, the data-size sweep, and one predicted frame.

Needs matplotlib (the ``demo`` extra); the command draws it last, after the tables and JSON are saved.
"""
from __future__ import annotations

import torch

__all__ = ["make_figure", "vorticity"]


def vorticity(v: torch.Tensor) -> torch.Tensor:
    """dv/dx - du/dy of one frame ``(2, H, W)`` (central differences, x along dim -2)."""
    u, w = v[0], v[1]
    return torch.gradient(w, dim=0)[0] - torch.gradient(u, dim=1)[0]


def make_figure(summary: dict, keep: dict, splits: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, selected = summary["rows"], {r["method"]: r for r in summary["selected"]}
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    swept = [("penalty", "tab:blue"), ("decay", "tab:orange"), ("so2", "tab:cyan")]
    swept = [(m, c) for m, c in swept if m in selected]     # the lambda curves of the routes that ran
    flat = [r for r in selected.values() if r["method"] not in dict(swept)]
    colors = {"none": "tab:gray", "projected": "tab:green", "rpp": "tab:purple", "relaxed": "tab:brown",
              "sample": "tab:red"}
    for ax, key in zip(axes[0, :3], ("validation_rmse", "future_rmse", "domain_rmse")):
        for method, color in swept:
            sw = sorted((r for r in rows if r["method"] == method), key=lambda r: r["weight"])
            ax.errorbar([r["weight"] for r in sw], [r[key] for r in sw], [r[key + "_std"] for r in sw],
                        fmt="o-", color=color, capsize=3, label=f"{method} (chosen lambda={selected[method]['weight']:g})")
        for r in flat:
            ax.axhline(r[key], color=colors.get(r["method"], "black"), ls="--", lw=1, label=r["label"])
        ax.set_xscale("log")
        ax.set_xlabel("lambda")
        ax.set_title(key.replace("_", " ") + (" (used to choose)" if key.startswith("valid") else ""), fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[0, 3]
    pts = summary["size_sweep"]
    for label in sorted({p["label"] for p in pts}):
        series = sorted((p for p in pts if p["label"] == label), key=lambda p: p["train_sims"])
        ax.errorbar([p["train_sims"] for p in series], [p["future_rmse"] for p in series],
                    [p["future_rmse_std"] for p in series], fmt="o-", capsize=3, label=label)
    ax.set_xlabel("training simulations")
    ax.set_ylabel("future RMSE")
    ax.set_title("data-size sweep", fontsize=10)
    ax.legend(fontsize=7)

    truth = splits["future"]["y"][-1].cpu()
    shown = [("true next frame", truth)]
    for method in ("none", "projected", "penalty"):
        if method in selected and (method, selected[method]["weight"]) in keep:
            shown.append((selected[method]["label"], keep[(method, selected[method]["weight"])]))
    lim = float(vorticity(truth).abs().max()) or 1.0
    for ax, (title, v) in zip(axes[1], shown):
        ax.imshow(vorticity(v).T.numpy(), origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        err = "" if v is truth else f"\nRMSE (normalised) {float((v - truth).square().mean().sqrt()):.3f}"
        ax.set_title(f"{title}{err}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("smoke plumes: next-frame RMSE against lambda (mean ± std over seeds), data-size sweep, "
                 "and the vorticity of one future frame", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
