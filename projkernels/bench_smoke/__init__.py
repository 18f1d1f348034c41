"""Smoke-plume benchmark: approximate-equivariance routes on 2-D smoke plumes simulated with PhiFlow.

The setting of Wang, Walters and Yu (ICML 2022): smoke rises from an inflow under buoyancy whose
magnitude depends on its direction, which breaks the rotation symmetry of the dynamics by a controlled
amount (``--breaking``); a model predicts the next velocity field from the last few, and is scored on
the training simulations' later frames ("future") and on simulations with unseen inflow positions
("domain").  Every route uses one plain ``nn.Conv2d`` backbone with velocity declared as C4 vector
fields and hidden regular fields (``symmetry``, the one declaration):

  - an unconstrained CNN and an exact C4 CNN (projected gradients and weights),
  - the projection penalty ``lambda ||W - P(W)||^2`` and the equivariance decay (lambda chosen on the
    validation split only),
  - the residual pathway prior, the relaxed group convolution and a sample-based regulariser.

Modules, one job each: ``symmetry`` (group, field types, the action on velocity), ``data`` (simulation,
cache, splits; needs PhiFlow, the ``smoke`` extra), ``models`` (backbone and routes), ``train`` (one run
and its scores), ``report`` (aggregation, choice on validation, tables, JSON), ``plot`` (the figure,
matplotlib) and ``cli`` (options, presets ``--tiny`` / default / ``--full``, order of the outputs).
Run it with ``python -m projkernels.bench_smoke`` (docs/smoke.md).
"""
from .cli import PRESETS, main, parse_args

__all__ = ["main", "parse_args", "PRESETS"]
