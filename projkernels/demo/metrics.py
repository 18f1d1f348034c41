"""How the demo scores a trained model: relative errors and equivariance error."""
from __future__ import annotations

import torch

from .data import ORDER, rotate

__all__ = ["relative_error", "equivariance_error", "equivariant_floor"]


@torch.no_grad()
def relative_error(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """sum ||f(x) - y||^2 / sum ||y||^2 over the set."""
    pred = model(x)
    return float((pred - y).square().sum() / y.square().sum())


@torch.no_grad()
def equivariance_error(f, x: torch.Tensor) -> float:
    """Mean over inputs and all 4 rotations (identity included) of ||f(gx) - g f(x)|| / ||f(x)||."""
    fx = f(x)
    norm = fx.flatten(1).norm(dim=1).clamp_min(1e-12)
    errs = [(f(rotate(x, k)) - rotate(fx, k)).flatten(1).norm(dim=1) / norm for k in range(ORDER)]
    return float(torch.stack(errs).mean())


@torch.no_grad()
def equivariant_floor(task, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test error of the C4-symmetrised target (1/4) sum_g g^-1 y(g x): the error an exactly
    equivariant model makes even with a perfect fit of the equivariant part."""
    sym = sum(rotate(task(rotate(x, k)), -k) for k in range(ORDER)) / ORDER
    return float((sym - y).square().sum() / y.square().sum())
