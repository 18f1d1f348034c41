# examples/steerable_so2.py: an approximately SO(2)-equivariant MLP with escnn's bases (needs escnn)
# (run: python examples/steerable_so2.py)
import math

import torch
from escnn import group, gspaces, nn as enn
from torch import nn

import projkernels as pk

torch.manual_seed(0)
# Plain nn.Linear layers; the symmetry says how SO(2) acts on their channels: the input is one
# vector (frequency-1 irrep), the hidden layer 8 vectors, the output one vector.
so2 = group.so2_group(2)
space = gspaces.no_base_space(so2)
vec = so2.irrep(1)
t_in, t_hid, t_out = (enn.FieldType(space, [vec] * n) for n in (1, 8, 1))
lin1, lin2 = nn.Linear(2, 16, bias=False), nn.Linear(16, 2, bias=False)
pk.attach_symmetry(lin1, pk.steerable(t_in, t_hid))
pk.attach_symmetry(lin2, pk.steerable(t_hid, t_out))


def model(x):
    h = lin1(x).view(-1, 8, 2)
    h = h * torch.sigmoid(h.norm(dim=-1, keepdim=True) - 0.5)  # a norm nonlinearity: commutes with rotations
    return lin2(h.reshape(-1, 16))


def rotate(x, angle):
    c, s = math.cos(angle), math.sin(angle)
    return x @ torch.tensor([[c, s], [-s, c]])


# Stand-in task: rotate by 30 degrees and shrink large vectors (equivariant), plus a small term
# that breaks the symmetry (the data is only approximately equivariant).
xs = torch.randn(512, 2)
ys = rotate(xs, math.pi / 6) * torch.exp(-xs.norm(dim=1, keepdim=True) ** 2 / 4)
ys = ys + 0.05 * torch.stack([xs[:, 1] ** 2, torch.zeros(512)], 1)
params = list(lin1.parameters()) + list(lin2.parameters())
opt = torch.optim.Adam(params, lr=1e-2)
layers = nn.Sequential(lin1, lin2)  # a container for model_penalty


def equivariance_error():
    with torch.no_grad():
        a = 1.234
        return float((model(rotate(xs, a)) - rotate(model(xs), a)).norm() / model(xs).norm())


print(f"at initialisation: equivariance error {equivariance_error():.2e}")
for step in range(300):
    loss = torch.nn.functional.mse_loss(model(xs), ys) + 1e-2 * pk.model_penalty(layers)
    opt.zero_grad(); loss.backward(); opt.step()
with torch.no_grad():
    task = float(torch.nn.functional.mse_loss(model(xs), ys))
    print(f"task loss {task:.4f}, penalty {float(pk.model_penalty(layers)):.2e}, "
          f"equivariance error {equivariance_error():.2e}")

pk.project_(layers)  # optional: make it exactly SO(2)-equivariant
print(f"after project_: penalty {float(pk.model_penalty(layers).detach()):.1e}, "
      f"equivariance error {equivariance_error():.1e}")
