"""Pure-PyTorch references: the brute-force group average, the orbit form and the spectral form.

``brute_force_project`` applies the definition P(W) = (1/|G|) sum_g rho_out(g) T_g(W) rho_in(g)^T
literally (|G| transformed copies of W, dense channel representations) and shares nothing with the
orbit machinery but the kernel action.  ``forward`` / ``backward`` / ``project`` / ``spectrum`` are
the reference backend: they work from the orbit table like the compiled kernels do, and
``spectrum`` takes the group's isotypic basis, so it serves any finite group given as data.
``spectral_spectrum`` is the torch.fft route for C_N and D_N only; the backend does not use it, the
tests keep it as a second, independently derived route to the same energies.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ...groups import FiniteGroup, get_group
from ...orbits import OrbitTable, acc_dtype, field_size  # acc_dtype: the one accumulation rule
from ...reps import side_of

__all__ = ["acc_dtype", "brute_force_project", "orbit_values", "forward", "backward", "project", "spectrum",
           "spectral_spectrum", "basis_spectrum", "decay_apply"]


# --- ground truth ------------------------------------------------------------------------------

def _dense_rep(group: FiniteGroup, rep, g: int, fields: int, dtype) -> torch.Tensor:
    """rho(g) on ``fields`` copies of the field ``rep``, from its matrices (signs included)."""
    rho = torch.as_tensor(side_of(group, rep).rep.matrices()[g], dtype=dtype)
    return torch.block_diag(*([rho] * fields))


def brute_force_project(weight: torch.Tensor, group="C4", in_rep="trivial", out_rep="trivial") -> torch.Tensor:
    """P(W) = (1/|G|) sum_g rho_out(g) T_g(W) rho_in(g)^T, computed as written (float64)."""
    G = get_group(group)
    w = weight.detach().to(torch.float64).cpu()
    c_out, c_in = w.shape[0] // field_size(out_rep, G), w.shape[1] // field_size(in_rep, G)
    total = torch.zeros_like(w)
    for g in range(G.order):
        r_out = _dense_rep(G, out_rep, g, c_out, w.dtype)
        r_in = _dense_rep(G, in_rep, g, c_in, w.dtype)
        t = G.kernel_action(w, g)
        total += torch.einsum("oa,ab...,ib->oi...", r_out, t, r_in)
    return total / G.order


# --- values near the dtype's largest finite value -------------------------------------------------
#
# As in the kernels (csrc/include/orbit_math.h): the orbit sum of values near the largest finite value
# overflows although the mean does not, and f - mean overflows for such values of opposite signs.
# The usual expressions stay; only where a result is not finite is it computed again on values
# scaled by DOWN = 2^-16 (exact; 2^16 >= any group order) and scaled back by UP, so finite results
# keep their bits.

DOWN, UP = 2.0 ** -16, 2.0 ** 16


def orbit_mean(f: torch.Tensor) -> torch.Tensor:
    """The mean of each row of ``f`` ([orbits, |G|] -> [orbits, 1]), finite wherever ``f`` is."""
    mean = f.mean(dim=1, keepdim=True)
    bad = ~torch.isfinite(mean)
    if not bool(bad.any()):
        return mean
    # Clamped to the row's range: the rounded sum of values at the largest finite value could
    # otherwise round the mean past it.
    scaled = torch.minimum(torch.maximum((f * DOWN).mean(dim=1, keepdim=True) * UP, f.amin(dim=1, keepdim=True)),
                           f.amax(dim=1, keepdim=True))
    return torch.where(bad, scaled, mean)


def finite_or_rescaled(value: torch.Tensor, scaled, up: float = UP) -> torch.Tensor:
    """``value``, or where it is not finite ``scaled(DOWN) * up``: ``scaled(d)`` is the same
    expression on the inputs multiplied by d (and ``up`` undoes that for the expression's degree)."""
    bad = ~torch.isfinite(value)
    if not bool(bad.any()):
        return value
    return torch.where(bad, scaled(DOWN) * up, value)


# --- orbit form: P(W) is the orbit mean ----------------------------------------------------------

def orbit_values(weight: torch.Tensor, table: OrbitTable):
    """Per orbit: f(g) = s(g, e) W[g . e] in the accumulation dtype, its mean, and 1/|Stab|."""
    acc = acc_dtype(weight.dtype)
    flat = weight.reshape(-1)
    idx = table.gather_index.to(weight.device)
    f = flat[idx].to(acc)
    if table.signed:
        f = f * table.gather_signs.to(device=weight.device, dtype=acc)
    mean = orbit_mean(f)
    inv_stab = table.inv_stab.to(device=weight.device, dtype=acc).repeat(table.n_blocks)
    return f, mean, inv_stab


def forward(weight: torch.Tensor, table: OrbitTable) -> Tuple[torch.Tensor, torch.Tensor]:
    """(penalty, eq_energy) in the accumulation dtype, penalty from deviations."""
    f, mean, inv_stab = orbit_values(weight, table)
    dev = f - mean
    # Per orbit; a sum that overflows (a repeated entry counts |Stab| times) on scaled deviations.
    parts = finite_or_rescaled(inv_stab * dev.square().sum(dim=1),
                               lambda d: inv_stab * (f * d - mean * d).square().sum(dim=1), UP * UP)
    penalty = parts.sum()
    eq_energy = (inv_stab * table.group.order * mean.squeeze(1).square()).sum()
    return penalty, eq_energy


def project(weight: torch.Tensor, table: OrbitTable) -> torch.Tensor:
    """P(W) in the accumulation dtype, shaped like the weight (orbit means scattered back)."""
    f, mean, _ = orbit_values(weight, table)
    out = torch.empty(weight.numel(), dtype=f.dtype, device=weight.device)
    idx = table.gather_index.to(weight.device)
    value = mean.expand_as(f)
    if table.signed:
        value = value * table.gather_signs.to(device=weight.device, dtype=f.dtype)  # P(W)[g . e] = s(g, e) mean
    out[idx.reshape(-1)] = value.reshape(-1)  # repeated entries carry the same value
    return out.reshape(weight.shape)


def backward(weight: torch.Tensor, table: OrbitTable, grad_penalty, grad_eq) -> torch.Tensor:
    """dW = 2 g_pen (W - P(W)) + 2 g_eq P(W), in the accumulation dtype."""
    w = weight.to(acc_dtype(weight.dtype))
    p = project(weight, table)
    return finite_or_rescaled(2 * grad_penalty * (w - p) + 2 * grad_eq * p,
                              lambda d: 2 * grad_penalty * (w * d - p * d) + 2 * grad_eq * (p * d))


# --- spectral form: isotypic energies -----------------------------------------------------------

def spectral_spectrum(weight: torch.Tensor, table: OrbitTable) -> torch.Tensor:
    """Isotypic energies via torch.fft over each orbit's cycle, in ``irrep_names`` order.

    C_N and D_N only (it reads the orbit as cycles of the rotation); kept as an independent
    cross-check of ``spectrum``, which the reference backend uses.

    The non-trivial energies come from the DFT of the deviations from the orbit mean (same values,
    no cancellation for nearly equivariant weights); the trivial one is |O| mean^2.
    """
    G = table.group
    f, mean, inv_stab = orbit_values(weight, table)
    dev = f - mean
    n = G.rotation_order
    trivial = (inv_stab * G.order * mean.squeeze(1).square()).sum()

    def cyclic_energies(spec):
        # |V_k|^2 / n per frequency, k and -k together for 0 < k < n/2.
        e = spec.abs().square() / n
        out = [None]
        for k in range(1, n // 2 + 1):
            out.append(e[:, k] if 2 * k == n else e[:, k] + e[:, n - k])
        return out

    if not G.has_reflections:
        parts = cyclic_energies(torch.fft.fft(dev, dim=1))
        energies = [trivial] + [(inv_stab * p).sum() for p in parts[1:]]
        return torch.stack(energies)
    # D_N: f on (0, j) and (1, j); the reflection swaps the two halves' DFTs (conjugated), so
    # A_k +- B_k at k = 0 and N/2 are the 1-D irreps, and |A_k|^2 + |B_k|^2 at 0 < k < N/2 the 2-D ones.
    A, B = torch.fft.fft(dev[:, :n], dim=1), torch.fft.fft(dev[:, n:], dim=1)
    pa, pb = cyclic_energies(A), cyclic_energies(B)
    def pm(k, sign):
        return (inv_stab * (A[:, k] + sign * B[:, k]).abs().square() / (2 * n)).sum()
    energies = [trivial, pm(0, -1)]
    energies += [(inv_stab * (pa[k] + pb[k])).sum() for k in range(1, (n - 1) // 2 + 1)]
    if n % 2 == 0:
        energies += [pm(n // 2, -1), pm(n // 2, +1)]  # (1,N/2): reflection -1; (0,N/2): +1
    return torch.stack(energies)


def basis_spectrum(weight: torch.Tensor, table: OrbitTable) -> torch.Tensor:
    """Isotypic energies from the group's real isotypic basis (the form the fused kernels use).

    Works for any finite group: per orbit, f(g) = W[g . e] minus its mean is expanded in the
    orthonormal basis whose rows each lie in one isotypic component; a row's squared coefficient,
    weighted by 1/|Stab|, adds to its irrep's energy.  The trivial energy is |O| mean^2, taken from
    the mean directly so that it is exact for nearly equivariant weights.
    """
    G = table.group
    f, mean, inv_stab = orbit_values(weight, table)
    basis, row_irrep = G.isotypic_basis
    b = torch.as_tensor(basis, dtype=f.dtype, device=f.device).T
    coeff = (f - mean) @ b
    # A deviation that overflowed makes a coefficient inf - inf: those on scaled values.
    energies = finite_or_rescaled(inv_stab[:, None] * coeff.square(),
                                  lambda d: inv_stab[:, None] * ((f * d - mean * d) @ b).square(), UP * UP)
    rows = energies.sum(dim=0)
    out = torch.zeros(len(G.irrep_names), dtype=f.dtype, device=f.device)
    out.index_add_(0, torch.as_tensor(row_irrep, device=f.device), rows)
    out[0] = (inv_stab * G.order * mean.squeeze(1).square()).sum()
    return out


# The reference backend's spectrum: the general route (any finite group given as data).
spectrum = basis_spectrum


def decay_apply(targets, weights, tables, coef_dev, coef_mean) -> None:
    """The decay slot: ``targets[l] += coef_dev[l] (W_l - P W_l) + coef_mean[l] P W_l`` in place, one
    layer at a time: P W from the orbit means, then the update in the accumulation dtype, rounded
    once into the target."""
    for i, (t, table) in enumerate(zip(targets, tables)):
        w = t if weights is None else weights[i]
        acc = acc_dtype(t.dtype)
        pw = project(w, table).reshape(t.shape)
        old, wa = t.to(acc), w.to(acc)
        # Near the dtype's largest finite value W - P W can overflow where the update does not:
        # there, the same update on scaled values.
        new = finite_or_rescaled(old + coef_dev[i] * (wa - pw) + coef_mean[i] * pw,
                                 lambda d: old * d + coef_dev[i] * (wa * d - pw * d) + coef_mean[i] * (pw * d))
        t.copy_(new)
