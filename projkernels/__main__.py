"""``python -m projkernels``: the penalty, relative non-equivariance and spectrum of two example weights."""
import argparse

import torch

from . import available_backends, irrep_names, penalty_and_energy, project, spectrum


def _row(name, w, group, in_rep, out_rep):
    penalty, eq = penalty_and_energy(w, group, in_rep, out_rep)
    rel = (penalty / (penalty + eq)).sqrt()
    spec = spectrum(w, group, in_rep, out_rep)
    energies = "  ".join(f"{float(e):10.4g}" for e in spec)
    print(f"{name:<28} {float(penalty):12.5g} {float(rel):12.3e}   {energies}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m projkernels", description=__doc__)
    parser.add_argument("--group", default="C4", help="C<N> or D<N> (default C4)")
    parser.add_argument("--fields", type=int, default=16, help="regular fields per side (default 16)")
    parser.add_argument("--kernel", type=int, default=3, help="kernel size (default 3)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    g = args.group
    from .groups import get_group
    from .orbits import orbit_table
    try:
        n = get_group(g, "--group").order
        shape = (args.fields * n, args.fields * n, args.kernel, args.kernel)
        orbit_table(shape, g, "regular", "regular")  # a group that cannot act on this kernel fails here
    except (TypeError, ValueError) as err:
        parser.error(str(err))  # a usage message, not a traceback
    w = torch.randn(*shape, dtype=torch.float64)
    print(f"backends for CPU tensors: {', '.join(available_backends('cpu'))}")
    print(f"weight {tuple(w.shape)}, {g} regular -> regular fields")
    header = "  ".join(f"{name:>10}" for name in irrep_names(g))
    print(f"{'weight':<28} {'penalty':>12} {'||W-PW||/||W||':>12}   {header}")
    _row("random", w, g, "regular", "regular")
    equivariant = project(w, g, "regular", "regular")
    _row("projected (escnn-style)", equivariant, g, "regular", "regular")
    _row("projected + 1e-3 noise", equivariant + 1e-3 * torch.randn_like(w), g, "regular", "regular")


if __name__ == "__main__":
    main()
