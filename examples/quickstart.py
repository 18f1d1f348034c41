# examples/quickstart.py: one layer's penalty, in a training loop (run: python examples/quickstart.py)
import torch
import torch.nn.functional as F

import projkernels as pk

torch.manual_seed(0)
conv = torch.nn.Conv2d(16 * 4, 16 * 4, 3, padding=1)  # 16 regular C4 fields in and out

# Stand-in data, loss and optimiser: use your own.
xs, ys = torch.randn(64, 64, 8, 8), torch.randn(64, 64, 8, 8)
loader = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]
task_loss = F.mse_loss
opt = torch.optim.Adam(conv.parameters(), lr=1e-2)

for epoch in range(5):
    for x, y in loader:
        penalty = pk.projected_penalty(conv.weight, "C4", in_rep="regular", out_rep="regular")
        loss = task_loss(conv(x), y) + 1.0 * penalty
        opt.zero_grad(); loss.backward(); opt.step()

w = conv.weight.detach()
print(f"||W - P(W)|| / ||W|| = {float(pk.projected_penalty(w, 'C4', 'regular', 'regular').sqrt() / w.norm()):.3f}")
w_eq = pk.project(w, "C4", in_rep="regular", out_rep="regular")  # the exactly equivariant part
print(f"penalty of P(W): {float(pk.projected_penalty(w_eq, 'C4', 'regular', 'regular')):.1e}")
spec = pk.spectrum(w, "C4", "regular", "regular")                # energy per irrep; "0" is ||P(W)||^2
print("energy per C4 irrep:", {k: round(v, 3) for k, v in zip(pk.irrep_names("C4"), spec.tolist())})
