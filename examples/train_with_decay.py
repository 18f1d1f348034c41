"""Train a small C4 G-CNN of plain nn.Conv2d layers with the equivariance decay (a few seconds on CPU).

The decay keeps the layers close to C4-equivariant without adding the penalty to the loss: before
every AdamW step, each attached weight's non-equivariant part W - P(W) shrinks by the factor
1 - 2 lr lambda_perp (one fused pass over all layers, no autograd graph).

    python examples/train_with_decay.py [--steps 60] [--lambda-perp 2.0] [--mode decoupled|coupled]
"""
import argparse
import os
import sys

import torch
from torch import nn

try:
    import projkernels as pk
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import projkernels as pk


class GCNN(nn.Module):
    """Lifting conv (trivial -> regular C4 fields), two group convs, and an invariant head."""

    def __init__(self, fields=4):
        super().__init__()
        width = 4 * fields
        self.convs = nn.ModuleList([nn.Conv2d(1, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1),
                                    nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, 1, 3, padding=1)])

    def forward(self, x):
        for conv in self.convs[:-1]:
            x = torch.relu(conv(x))
        return self.convs[-1](x)


def non_equivariance(model):
    """||W - P(W)|| / ||W|| per attached layer."""
    return [r["relative"] for r in pk.equivariance_report(model)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lambda-perp", type=float, default=2.0)
    p.add_argument("--mode", choices=["decoupled", "coupled"], default="decoupled")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    # Data: a target from a fixed random network, so it is not equivariant.
    teacher = GCNN()
    x = torch.randn(64, 1, 12, 12)
    with torch.no_grad():
        y = teacher(x)

    model = GCNN()
    pk.attach_regular_gcnn(model, "C4", first_in="trivial", last_out="trivial")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    decay = pk.equivariance_decay(opt, model, lambda_perp=args.lambda_perp, mode=args.mode)

    before = non_equivariance(model)
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()          # the decay runs here, just before AdamW's update
        sched.step()
    after = non_equivariance(model)
    decay.remove()

    print(f"{decay}: {decay.steps} steps, {1e3 * decay.host_seconds / max(decay.steps, 1):.3f} ms per step in the decay")
    print(f"final task loss {loss.item():.4f}")
    print("layer  ||W - P(W)|| / ||W||: before -> after")
    for i, (b, a) in enumerate(zip(before, after)):
        print(f"{i:5d}  {b:.3f} -> {a:.3f}")
    if args.mode == "decoupled" and args.lambda_perp > 0:
        assert all(a < b for a, b in zip(after, before)), "the decay should have reduced every layer's deviation"
    return after


if __name__ == "__main__":
    main()
