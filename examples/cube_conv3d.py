# examples/cube_conv3d.py: an approximately O-equivariant 3-D CNN (run: python examples/cube_conv3d.py)
import torch
import torch.nn.functional as F
from torch import nn

import projkernels as pk

torch.manual_seed(0)
G = "O"                      # the cube's 24 rotations; "Oh" adds the reflections (48), "T" is the tetrahedron's 12
n = pk.get_group(G).order    # a regular field is n channels, one per element (escnn's octaOnR3() order)
fields = 2

# Plain Conv3d layers: one scalar channel in, 2 regular fields inside, one scalar channel out.
model = nn.Sequential(
    nn.Conv3d(1, fields * n, 3, padding=1), nn.ReLU(),
    nn.Conv3d(fields * n, fields * n, 3, padding=1), nn.ReLU(),
    nn.Conv3d(fields * n, 1, 3, padding=1),
)
pk.attach_regular_gcnn(model, G, first_in="trivial", last_out="trivial")
pk.project_(model)           # start exactly equivariant; the penalty then lets the data break it a little

# Stand-in task on 8x8x8 volumes: a 3-D Laplacian (invariant under the cube's rotations) plus a little
# d/dx (which is not), so the best model is only approximately equivariant.
lap = torch.zeros(3, 3, 3)
lap[1, 1, 1] = -6.0
for i, j, k in [(0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)]:
    lap[i, j, k] = 1.0
ddx = torch.zeros(3, 3, 3)
ddx[1, 1, 0], ddx[1, 1, 2] = -0.5, 0.5
xs = torch.randn(32, 1, 8, 8, 8)
ys = F.conv3d(xs, (lap + 0.2 * ddx)[None, None], padding=1)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)

for step in range(30):
    x, y = xs[step % 4 * 8:][:8], ys[step % 4 * 8:][:8]
    loss = F.mse_loss(model(x), y) + pk.model_penalty(model, lambda_perp=1.0)
    opt.zero_grad(); loss.backward(); opt.step()
print(pk.format_report(pk.equivariance_report(model)))


def rotation_error(m):
    """How far m is from commuting with a quarter turn of the volume (about the first dim's axis)."""
    with torch.no_grad():
        turn = lambda v: torch.rot90(v, 1, dims=(-2, -1))
        return float((m(turn(xs)) - turn(m(xs))).norm() / m(xs).norm())


print(f"rotation error {rotation_error(model):.2e}")
pk.project_(model)           # optional: exactly O-equivariant again (here: invariant, scalar in and out)
print(f"after project_: penalty {float(pk.model_penalty(model).detach()):.1e}, "
      f"rotation error {rotation_error(model):.1e}")
