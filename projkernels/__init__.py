"""projkernels: the exact projection penalty ||W - P(W)||^2 for approximately equivariant networks."""
from .api import equivariant_energy, penalty_and_energy, project, projected_penalty, spectrum
from .backends import available_backends, load_optional_backends
from .groups import FiniteGroup, get_group, irrep_names, register_group
from .orbits import orbit_table

__version__ = "0.1.0"

load_optional_backends()

from .multi import multi_penalty, register_multi_backend  # noqa: E402  (after the backends: "auto" sees them)
from .model import (Symmetry, attach_regular_gcnn, attach_symmetries, attach_symmetry,  # noqa: E402
                    attached_layers, detach_symmetry, equivariance_report, format_report, get_symmetry,
                    model_penalty, project_)

__all__ = [
    # single weights
    "projected_penalty", "equivariant_energy", "penalty_and_energy", "project", "spectrum", "irrep_names",
    # whole models
    "multi_penalty", "model_penalty", "project_", "attach_symmetry", "attach_symmetries", "attach_regular_gcnn",
    "attached_layers", "detach_symmetry", "get_symmetry", "Symmetry", "equivariance_report", "format_report",
    # groups, tables, backends
    "get_group", "register_group", "FiniteGroup", "orbit_table", "available_backends", "register_multi_backend",
]
from .decay import equivariance_decay; __all__.append("equivariance_decay")  # noqa: E402,E702
# Steerable symmetries (escnn bases).  Note: the name ``projkernels.steerable`` is the function; the
# module is reached as ``from projkernels.steerable import ...``.
from .steerable import SteerableSymmetry, steerable  # noqa: E402
__all__ += ["steerable", "SteerableSymmetry"]
