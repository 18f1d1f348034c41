# examples/minimal.py: the projection penalty of a plain C4 G-CNN in a training step (run: python examples/minimal.py)
import torch
from torch import nn

import projkernels as pk

model = nn.Sequential(nn.Conv2d(1, 8 * 4, 3, padding=1), nn.ReLU(), nn.Conv2d(8 * 4, 1, 3, padding=1))
pk.attach_regular_gcnn(model, "C4", first_in="trivial", last_out="trivial")  # 8 regular C4 fields inside
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.randn(16, 1, 12, 12), torch.randn(16, 1, 12, 12)
loss = nn.functional.mse_loss(model(x), y) + pk.model_penalty(model, lambda_perp=1.0)  # task + lambda ||W - P(W)||^2
opt.zero_grad(); loss.backward(); opt.step()
print(pk.format_report(pk.equivariance_report(model)))  # per layer: ||W - P(W)|| / ||W|| and the spectrum
