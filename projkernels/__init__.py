"""projkernels: the exact projection penalty ||W - P(W)||^2 for approximately equivariant networks.

The public names are all here; the layout below them is described in docs/design.md ("The map")."""
from .api import equivariant_energy, penalty_and_energy, project, projected_penalty, spectrum
from .backends import available_backends, load_optional_backends
from .groups import FiniteGroup, get_group, irrep_names, register_group
from .orbits import orbit_table
from .reps import register_rep, rep_names
from .dispatch.multi import multi_penalty, register_multi_backend
from .model import (Symmetry, attach_regular_gcnn, attach_symmetries, attach_symmetry, attached_layers,
                    detach_symmetry, equivariance_report, format_report, get_symmetry, model_penalty, project_)
from .decay import equivariance_decay
# Steerable symmetries (escnn bases): ``projkernels.steerable`` is the function; the module is
# ``projkernels.symmetry.steerable``.
from .symmetry.steerable import SteerableSymmetry, steerable

__version__ = "0.1.0"

__all__ = [
    # single weights
    "projected_penalty", "equivariant_energy", "penalty_and_energy", "project", "spectrum", "irrep_names",
    # whole models
    "multi_penalty", "model_penalty", "project_", "attach_symmetry", "attach_symmetries", "attach_regular_gcnn",
    "attached_layers", "detach_symmetry", "get_symmetry", "Symmetry", "equivariance_report", "format_report",
    # groups, tables, backends
    "get_group", "register_group", "FiniteGroup", "orbit_table", "available_backends", "register_multi_backend",
    # field types (signed-permutation representations)
    "register_rep", "rep_names",
    "equivariance_decay",
    "steerable", "SteerableSymmetry",
]
