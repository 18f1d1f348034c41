"""projkernels: the exact projection penalty ||W - P(W)||^2 for approximately equivariant networks."""
from .api import equivariant_energy, penalty_and_energy, project, projected_penalty, spectrum
from .backends import available_backends, load_optional_backends
from .groups import FiniteGroup, get_group, irrep_names, register_group
from .orbits import orbit_table

__version__ = "0.1.0"

load_optional_backends()

__all__ = ["projected_penalty", "equivariant_energy", "penalty_and_energy", "project", "spectrum",
           "irrep_names", "get_group", "register_group", "FiniteGroup", "orbit_table", "available_backends"]
from .model import Symmetry, attach_symmetry, attach_symmetries, attach_regular_gcnn, attached_layers, detach_symmetry, get_symmetry, model_penalty, project_, equivariance_report, format_report  # noqa: E402
from .multi import multi_penalty, register_multi_backend  # noqa: E402
