# examples/decay_quickstart.py: the equivariance decay inside AdamW's step (run: python examples/decay_quickstart.py)
import torch
import torch.nn.functional as F

import projkernels as pk

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(4 * 4, 8 * 4, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(8 * 4, 4 * 4, 3, padding=1))
pk.attach_regular_gcnn(model, "C4", first_in="regular", last_out="regular")  # C4 regular fields throughout

# Stand-in data and loss: use your own.
xs, ys = torch.randn(64, 16, 8, 8), torch.randn(64, 16, 8, 8)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
decay = pk.equivariance_decay(opt, model, lambda_perp=5.0, mode="decoupled")  # no penalty in the loss

for step in range(40):
    x, y = xs[step % 4 * 16:][:16], ys[step % 4 * 16:][:16]
    loss = F.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()  # the decay runs here, before AdamW's update
decay.remove()

for r in pk.equivariance_report(model):
    print(f"{r['name']}: ||W - P(W)|| / ||W|| = {r['relative']:.3f}")
