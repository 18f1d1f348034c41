"""The reference multi-tensor route: every weight concatenated into one buffer.

Layers whose groups have the same order share one gather (the orbit width is |G|), and one segment
reduction turns per-orbit partials into per-layer values, however many layers there are.  It is the
"reference" backend's multi-tensor slot (over projkernels/dispatch/multi_table.py's ``MultiTable``).
"""
from __future__ import annotations

from typing import Tuple

import torch

from ...orbits import acc_dtype
from .finite import UP, finite_or_rescaled, orbit_mean

__all__ = ["reference_multi_forward", "reference_multi_backward"]


def _orbit_rows(buffer: torch.Tensor, bucket, acc: torch.dtype) -> torch.Tensor:
    """f[g] = s(g, e) W[g . e] for every orbit of the bucket."""
    f = buffer.index_select(0, bucket.index.reshape(-1)).view(-1, bucket.order).to(acc)
    return f if bucket.sign is None else f * bucket.sign


def reference_multi_forward(buffer: torch.Tensor, table) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (penalty, eq_energy) in the accumulation dtype, penalty from deviations."""
    acc = acc_dtype(buffer.dtype)
    sums = torch.zeros(table.n_layers, 2, dtype=acc, device=buffer.device)
    for b in table.on(buffer.device, acc)[0]:
        f = _orbit_rows(buffer, b, acc)
        mean = orbit_mean(f)
        # Overflowing values (docs/design.md, "Numerical choices"): as the single-weight reference.
        pen = finite_or_rescaled(b.inv_stab * (f - mean).square().sum(dim=1),
                                 lambda d: b.inv_stab * (f * d - mean * d).square().sum(dim=1), UP * UP)
        sums.index_add_(0, b.layer, torch.stack((pen, b.order * mean.squeeze(1).square() * b.inv_stab), dim=1))
    return sums[:, 0], sums[:, 1]


def reference_multi_backward(buffer: torch.Tensor, table, grad_penalty: torch.Tensor,
                             grad_eq: torch.Tensor) -> torch.Tensor:
    """2 gp_l (W - P W) + 2 ge_l P W for every layer l, over the buffer, in the accumulation dtype.

    P W is the orbit means read back through ``orbit_of`` (a gather, not a scatter), and the
    penalty part is taken from the deviations W - P W entry by entry, as the single-layer route does.
    """
    acc = acc_dtype(buffer.dtype)
    buckets, orbit_of, numels, orbit_sign = table.on(buffer.device, acc)
    means = torch.cat([orbit_mean(_orbit_rows(buffer, b, acc)).squeeze(1) for b in buckets])
    pw = means.index_select(0, orbit_of)
    if orbit_sign is not None:
        pw = pw * orbit_sign
    n = buffer.numel()
    gp = torch.repeat_interleave(2 * grad_penalty.to(acc), numels, output_size=n)
    ge = torch.repeat_interleave(2 * grad_eq.to(acc), numels, output_size=n)
    w = buffer.to(acc)
    return finite_or_rescaled(gp * (w - pw) + ge * pw, lambda d: gp * (w * d - pw * d) + ge * (pw * d))
