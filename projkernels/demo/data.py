"""The demo's task: smoothed random fields and a target that is rotation-equivariant up to a
fixed, non-rotating term.

    y(x) = F(x) / s_F + breaking * B(x) / s_B

F is a fixed C4-equivariant nonlinear operator (Laplacian + squared gradient + ReLU, all with zero
padding, which rot90 maps onto itself) and B the horizontal derivative d/dx, which does not rotate
with the input: its C4 average is zero, so ``breaking`` sets how far the data are from equivariance.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

ORDER = 4  # the demo's group is C4

__all__ = ["ORDER", "random_fields", "equivariant_part", "breaking_part", "Task", "rotate", "make_data"]


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = g[:, None] * g[None, :]
    return (k / k.sum())[None, None]


def random_fields(n: int, size: int, generator: torch.Generator, device, sigma: float = 1.5) -> torch.Tensor:
    """Smoothed white noise with unit standard deviation; blurred with 'valid' padding so the
    border has the same statistics as the inside (the input law is then exactly rotation invariant)."""
    k = _gaussian_kernel(sigma, device)
    r = k.shape[-1] // 2
    noise = torch.randn(n, 1, size + 2 * r, size + 2 * r, generator=generator).to(device)
    x = F.conv2d(noise, k)
    return x / x.std()


_LAP = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]])
_DX = torch.tensor([[0., 0., 0.], [-0.5, 0., 0.5], [0., 0., 0.]])


def _stencil(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, k.to(x)[None, None], padding=1)


def equivariant_part(x: torch.Tensor) -> torch.Tensor:
    """F(x): Laplacian + squared gradient + ReLU, each commuting with rot90 (zero padding included)."""
    dx = _stencil(x, _DX)
    dy = _stencil(x, _DX.T)
    return _stencil(x, _LAP) + 2.0 * (dx ** 2 + dy ** 2) + torch.relu(x)


def breaking_part(x: torch.Tensor) -> torch.Tensor:
    """B(x) = d/dx x, a fixed direction: rotating the input does not rotate this term."""
    return _stencil(x, _DX)


class Task:
    """y = F(x)/s_F + breaking * B(x)/s_B, with s_F, s_B the (fixed) standard deviations on a sample."""

    def __init__(self, breaking: float, size: int, seed: int, device):
        g = torch.Generator().manual_seed(seed + 1)
        probe = random_fields(512, size, g, device)
        self.s_f = float(equivariant_part(probe).std())
        self.s_b = float(breaking_part(probe).std())
        self.breaking = breaking

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return equivariant_part(x) / self.s_f + self.breaking * breaking_part(x) / self.s_b


def rotate(x: torch.Tensor, k: int) -> torch.Tensor:
    """The C4 element r^k on a scalar field: the same rot90 as the kernel action (docs/design.md,
    Conventions), so a model whose layers are exactly equivariant commutes with it."""
    return torch.rot90(x, k, dims=(-2, -1))


def make_data(task: Task, train_size: int, test_size: int, size: int, seed: int, device) -> Dict[str, torch.Tensor]:
    """Training and test inputs and targets; the inputs depend on ``seed`` only, not on the task, so
    runs at several breaking strengths see the same fields."""
    gen = torch.Generator().manual_seed(seed)
    x_train = random_fields(train_size, size, gen, device)
    x_test = random_fields(test_size, size, gen, device)
    return {"x_train": x_train, "y_train": task(x_train), "x_test": x_test, "y_test": task(x_test)}
