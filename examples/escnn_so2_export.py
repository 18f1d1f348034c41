# examples/escnn_so2_export.py: fine-tune escnn's plain-PyTorch export of an SO(2) CNN (needs escnn)
# (run: python examples/escnn_so2_export.py)
import torch
from escnn import gspaces, nn as enn

import projkernels as pk
from projkernels.escnn_interop import from_escnn_export

torch.manual_seed(0)
so2 = gspaces.rot2dOnR2(-1)                                        # continuous rotations of the plane
t_in = enn.FieldType(so2, [so2.trivial_repr])
t_irr = enn.FieldType(so2, [so2.irrep(0)] * 4 + [so2.irrep(1)] * 4 + [so2.irrep(2)] * 2)  # irrep fields
t_sc = enn.FieldType(so2, 8 * [so2.trivial_repr])
net = enn.SequentialModule(
    enn.R2Conv(t_in, t_irr, 5, padding=2, frequencies_cutoff=1.5),  # basis options are read off the layer
    enn.R2Conv(t_irr, t_sc, 3, padding=1), enn.ReLU(t_sc), enn.PointwiseMaxPool2D(t_sc, 2),
    enn.R2Conv(t_sc, enn.FieldType(so2, [so2.irrep(0)]), 3, padding=1))
with torch.no_grad():                                              # escnn starts its biases at zero
    for m in net.modules():
        if isinstance(m, enn.R2Conv):
            m.bias.normal_()

plain = from_escnn_export(net)          # nn.Conv2d layers with steerable symmetries attached
plain.train()
print(f"at export: penalty {float(pk.model_penalty(plain).detach()):.1e} (weights and biases)")

# Stand-in task that is only nearly rotation-invariant: fine-tune the plain model, and let the penalty
# keep it close to escnn's equivariant space.
xs = torch.randn(64, 1, 16, 16)
ys = xs.square().mean(dim=(1, 2, 3)) + 0.1 * xs[:, 0, :8].mean(dim=(1, 2))
opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
for step in range(30):
    pred = plain(xs).mean(dim=(1, 2, 3))
    loss = torch.nn.functional.mse_loss(pred, ys) + 1.0 * pk.model_penalty(plain)
    opt.zero_grad(); loss.backward(); opt.step()
print(f"after fine-tuning: penalty {float(pk.model_penalty(plain).detach()):.2e}")
print(pk.format_report(pk.equivariance_report(plain)))

pk.project_(plain)                      # back onto escnn's space, biases included
print(f"after project_: penalty {float(pk.model_penalty(plain).detach()):.1e}")
