"""Demo: learning a nearly C4-equivariant map with the projection penalty.

The task is generated in-process.  Inputs are smoothed random fields x (1 x S x S).  The target is

    y(x) = F(x) + breaking * B(x),

F a fixed C4-equivariant nonlinear operator (Laplacian + squared gradient + ReLU, all with zero
padding, which rot90 maps onto itself) and B the fixed horizontal derivative d/dx, which does not
rotate with the input: its C4 average is zero, so ``breaking`` sets how far the data are from
equivariance.  A small C4 regular G-CNN made of plain ``nn.Conv2d`` (lifting conv trivial ->
regular, group convs regular -> regular, head regular -> trivial) is trained

  - with no penalty (a plain CNN of the same shape),
  - with the projection penalty ``lambda * sum_layers ||W - P(W)||^2`` for each lambda,
  - projected: an exact G-CNN throughout (gradients projected before each Adam step, weights
    projected after it),
  - with a sample-based regulariser: one random rotation g per step and ``mu * ||f(gx) - g f(x)||^2``
    added to the loss (an extra forward and backward pass).

The setup is the data-limited regime on purpose (defaults: 64 training fields of 12 x 12, 1024 test
fields, 400 Adam steps): there the unpenalised CNN overfits, the symmetry prior helps, and exact
equivariance is too rigid when the data break the symmetry.  Each breaking strength (``--breaking``
and ``--compare-breaking``, default 0.3 and 0) gets its own table; the sample-based run is made only
for the first.

Reported per run: test and train error (||f(x) - y||^2 / ||y||^2 over the set), equivariance error
(mean over test inputs and all 4 rotations, identity included, of ||f(gx) - g f(x)|| / ||f(x)||),
time per step and the share of it spent on the regulariser (its extra forward + backward, timed
separately with perf_counter after the task loss's backward; for the projected run the projection).
The reference line gives the 'exact-equivariance floor', the test error of the symmetrised target:
an exact G-CNN can do no better, and in practice adds its own fitting error on top (about 0.035
here, the same as its whole test error with breaking=0).

What a default run showed (seed 0, see docs/demo.png): with breaking=0.3 test error is U-shaped in
lambda: no penalty 0.045 (train 0.027, it overfits), lambda=0.1-1 about 0.037, the exact G-CNN
0.076, lambda=100 0.108.  With breaking=0 the exact G-CNN is best (0.035), lambda=1 close (0.038),
no penalty 0.048 (worse than every lambda up to 10).

All runs start from the same exactly equivariant initialisation (see ``models.build_model``) and use Adam.
The projected run projects the gradient before each step (see ``models.project_grads_``); projecting
only the weights after a plain Adam step trained markedly worse.  With Adam, large lambdas (>= ~100
here) make the weights nearly equivariant but slow down learning, because the stiff penalty
gradient dominates Adam's per-coordinate step-size normalisation, so lambda=100 ends worse than the
projected run; for exact equivariance, project instead.

Modules, one job each: ``data`` (the task and its fields), ``models`` (the G-CNN, its equivariant
initialisation, gradient projection and the sample-based regulariser; the benchmarks use the same
G-CNN), ``metrics`` (scores), ``train`` (one training run), ``report`` (tables and JSON), ``plot``
(the figure, the only part needing matplotlib) and ``cli`` (options and the order of the outputs).
Run it with ``python -m projkernels.demo``.
"""
from .cli import main, parse_args
from .data import ORDER, Task, breaking_part, equivariant_part, make_data, random_fields, rotate
from .metrics import equivariance_error, equivariant_floor, relative_error
from .models import GCNN, build_model, project_grads_, sample_equivariance_loss
from .report import build_summary, format_table, verdict
from .train import Progress, train_run

__all__ = ["main", "parse_args", "ORDER", "Task", "breaking_part", "equivariant_part", "make_data",
           "random_fields", "rotate", "equivariance_error", "equivariant_floor", "relative_error", "GCNN",
           "build_model", "project_grads_", "sample_equivariance_loss", "build_summary", "format_table",
           "verdict", "Progress", "train_run"]
