# examples/train_with_penalty.py: a whole model: attach, penalise, project (run: python examples/train_with_penalty.py)
import torch
import torch.nn.functional as F
from torch import nn

import projkernels as pk

torch.manual_seed(0)
# A C4 G-CNN written with plain convolutions: 8 regular fields (8 x 4 channels) inside,
# one scalar channel in and out.
model = nn.Sequential(
    nn.Conv2d(1, 8 * 4, 3, padding=1), nn.ReLU(),
    nn.Conv2d(8 * 4, 8 * 4, 3, padding=1), nn.ReLU(),
    nn.Conv2d(8 * 4, 1, 3, padding=1),
)
pk.attach_regular_gcnn(model, "C4", first_in="trivial", last_out="trivial")  # or pk.attach_symmetry(layer, ...)

# Stand-in task: a nearly rotation-equivariant target (a Laplacian plus a little d/dx).
lap = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]])
ddx = torch.tensor([[0., 0., 0.], [-.5, 0., .5], [0., 0., 0.]])
xs = torch.randn(128, 1, 12, 12)
ys = F.conv2d(xs, (lap + 0.2 * ddx)[None, None], padding=1)
loader = [(xs[i:i + 32], ys[i:i + 32]) for i in range(0, 128, 32)]
task_loss = F.mse_loss
opt = torch.optim.Adam(model.parameters(), lr=3e-3)

for epoch in range(10):
    for x, y in loader:
        loss = task_loss(model(x), y) + pk.model_penalty(model, lambda_perp=1.0, lambda_G=0.0)
        opt.zero_grad(); loss.backward(); opt.step()
with torch.no_grad():
    print(f"task loss {float(task_loss(model(xs), ys)):.4f}, penalty {float(pk.model_penalty(model)):.3e}")
print(pk.format_report(pk.equivariance_report(model)))

pk.project_(model)                                   # optional: make it exactly equivariant
print(f"after project_: penalty {float(pk.model_penalty(model).detach()):.1e}")
