"""What people compute today instead of projkernels, written as they would write it.

- ``EagerGroupLoop``: sum over g of ||W - Pi_g W||^2 / (2|G|) with rot90 / flip copies (for the cube
  groups on Conv3d weights: flips and a permutation of the three kernel dims) and channel
  permutations.  For an orthogonal action sum_g ||W - Pi_g W||^2 = 2|G| ||W - P W||^2, so this is the
  same number as the projection penalty.
- ``compiled_gather_penalty``: ``torch.compile`` of the pure-PyTorch orbit-gather code of
  ``projkernels.backends.reference`` (gather orbit rows, subtract the mean, square, sum), and
  ``compiled_group_loop``: ``torch.compile`` of the eager loop.
- ``DenseBasis``: the published route: a dense orthonormal basis Q (N x D) of the equivariant
  subspace, penalty = ||w||^2 - ||Q^T w||^2.  The published code orthonormalises an escnn basis by
  QR; applying any dense N x D matrix with orthonormal columns costs the same, so Q here holds the
  orbit-indicator basis, normalised, as a dense matrix.
- ``sample_equivariance_loss``: the sample-based regulariser ||f(g x) - g f(x)||^2 with one sampled g
  per step, on the package's G-CNN of plain ``nn.Conv2d`` layers (``projkernels.demo.models.GCNN``,
  the same network the demo trains).
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch

from projkernels import get_group, orbit_table
from projkernels.demo.models import GCNN, sample_equivariance_loss

__all__ = ["EagerGroupLoop", "compiled_gather_penalty", "compiled_group_loop", "gather_inputs",
           "DenseBasis", "GCNN", "sample_equivariance_loss", "gcnn_layer_specs"]


def _channel_perm(group, rep: str, g: int, channels: int):
    """Index p with (rho(g) x)[c] = x[p[c]] for rho(g) e_h = e_{g h} on every field; None for trivial."""
    if rep == "trivial":
        return None
    n = group.order
    ginv = int(group.inverse[g])
    comp = torch.as_tensor(group.mul[ginv], dtype=torch.int64)      # (rho(g) v)_a = v_{g^-1 a}
    fields = torch.arange(channels // n, dtype=torch.int64)[:, None] * n
    return (fields + comp[None, :]).reshape(-1)


class EagerGroupLoop:
    """sum_g ||W - Pi_g(W)||^2 / (2|G|), one transformed copy of W per group element."""

    def __init__(self, shape: Sequence[int], group="C4", in_rep="trivial", out_rep="trivial", device="cpu"):
        G = get_group(group)
        self.order = G.order
        self.ops = []
        spatial = len(shape) == 4 and shape[-1] > 1
        cube = len(shape) == 5 and shape[-1] > 1
        for g, (flip, rot) in enumerate(G.elements):
            po = _channel_perm(G, out_rep, g, shape[0])
            pi = _channel_perm(G, in_rep, g, shape[1])
            if cube:
                # A signed permutation of the grid: flip some kernel dims, then permute them.
                flips, perm = _flip_and_permute(G.matrices[g])
                geometry = (flips, perm)
            else:
                geometry = (bool(flip) and spatial, rot * 4 // G.rotation_order if spatial else 0)
            self.ops.append((cube, geometry, None if po is None else po.to(device),
                             None if pi is None else pi.to(device)))

    def transformed(self, w: torch.Tensor, op) -> torch.Tensor:
        cube, geometry, po, pi = op
        if cube:
            flips, perm = geometry
            t = torch.flip(w, flips) if flips else w
            t = t.permute(0, 1, *perm)
        else:
            flip, k = geometry
            t = torch.flip(w, [-1]) if flip else w
            if k:
                t = torch.rot90(t, k, dims=(-2, -1))
        if po is not None:
            t = t.index_select(0, po)
        if pi is not None:
            t = t.index_select(1, pi)
        return t

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        total = 0
        for op in self.ops:
            total = total + (w - self.transformed(w, op)).square().sum()
        return total / (2 * self.order)


def _flip_and_permute(matrix):
    """(dims to flip, order of the kernel dims) that move a (out, in, k, k, k) kernel by the 3x3
    ``matrix`` on points (x, y, z) = (c - o, o - b, o - a) of the grid (docs/design.md, Conventions)."""
    grid = torch.tensor([[0, 0, 1], [0, -1, 0], [-1, 0, 0]])
    a_inv = (grid.T @ torch.as_tensor(matrix.tolist()) @ grid).T     # the move on array indices, inverted
    src = a_inv.abs().argmax(dim=1)
    flips = [2 + i for i in range(3) if a_inv[i, src[i]] < 0]
    return flips, [2 + int(d) for d in torch.argsort(src)]


# --- torch.compile baselines -------------------------------------------------------------------

def gather_inputs(shape, group, in_rep, out_rep, device="cpu"):
    """The orbit gather index and 1/|Stab| per orbit, as the reference backend uses them."""
    t = orbit_table(tuple(shape), group, in_rep, out_rep)
    return t.gather_index.to(device), t.inv_stab.repeat(t.n_blocks).to(device=device, dtype=torch.float32)


def _gather_penalty(w, idx, inv_stab):
    f = w.reshape(-1)[idx].float()
    mean = f.mean(dim=1, keepdim=True)
    return (inv_stab * (f - mean).square().sum(dim=1)).sum()


def _gather_penalty_many(ws: List[torch.Tensor], idxs, inv_stabs):
    total = 0
    for w, idx, s in zip(ws, idxs, inv_stabs):
        total = total + _gather_penalty(w, idx, s)
    return total


def _raise_recompile_limit():
    import torch._dynamo
    # The benchmark compiles one graph per shape; the default limit would silently fall back to eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


@functools.lru_cache(maxsize=None)
def compiled_gather_penalty(many: bool = False):
    """``torch.compile`` of the reference's gather code (one weight, or a list of weights)."""
    _raise_recompile_limit()
    return torch.compile(_gather_penalty_many if many else _gather_penalty, dynamic=False)


def compiled_group_loop(loop: EagerGroupLoop):
    _raise_recompile_limit()
    return torch.compile(loop.__call__, dynamic=False)


# --- dense basis -------------------------------------------------------------------------------

class DenseBasis:
    """penalty = ||w||^2 - ||Q^T w||^2 with a dense orthonormal basis Q of the equivariant subspace."""

    def __init__(self, shape, group="C4", in_rep="trivial", out_rep="trivial", device="cpu", dtype=torch.float32):
        t = orbit_table(tuple(shape), group, in_rep, out_rep)
        idx = t.gather_index                                       # [D, |G|]
        n, d = int(torch.tensor(shape).prod()), idx.shape[0]
        orbit_size = t.inv_stab.repeat(t.n_blocks) * t.group.order          # |O| = |G| / |Stab|
        cols = torch.arange(d)[:, None].expand_as(idx)
        q = torch.zeros(n, d, dtype=dtype)
        q[idx, cols] = orbit_size.rsqrt().to(dtype)[cols]                    # repeated entries: same value
        self.Q = q.to(device)                                                 # [N, D], orthonormal columns
        self.numel, self.dim = n, d

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        v = w.reshape(-1).to(self.Q.dtype)
        return v.square().sum() - (self.Q.T @ v).square().sum()


# --- the layer shapes of a small C4 group CNN ---------------------------------------------------

def gcnn_layer_specs(widths: Sequence[int], in_channels: int = 3, n_classes: int = 10, group="C4",
                     kernel: int = 3) -> List[Tuple[Tuple[int, ...], str, str, str]]:
    """(shape, group, in_rep, out_rep) of a lifting conv, regular->regular convs, and a 1x1 head."""
    n = get_group(group).order
    specs = [((n * widths[0], in_channels, kernel, kernel), group, "trivial", "regular")]
    for a, b in zip(widths[:-1], widths[1:]):
        specs.append(((n * b, n * a, kernel, kernel), group, "regular", "regular"))
    specs.append(((n_classes, n * widths[-1], 1, 1), group, "regular", "trivial"))
    return specs
