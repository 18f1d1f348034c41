"""The benchmark's baselines compute the same number as the projection penalty (so the timings
compare like with like).  Run with ``python -m pytest bench/test_baselines.py``; .ci/run does."""
import pytest
import torch

import baselines as bl  # bench/ is on sys.path through bench/conftest.py
from projkernels.backends.reference import brute_force_project


@pytest.mark.parametrize("shape,group,in_rep,out_rep", [
    ((8, 8, 3, 3), "C4", "regular", "regular"),
    ((16, 8, 3, 3), "D4", "trivial", "regular"),
    ((6, 16, 4, 4), "D4", "regular", "trivial"),
    ((12, 8), "C4", "regular", "regular"),
    ((48, 2, 3, 3, 3), "Oh", "trivial", "regular"),
    ((24, 24, 2, 2, 2), "O", "regular", "regular"),
    ((3, 2, 4, 4, 4), "T", "trivial", "trivial"),
])
def test_baselines_equal_the_penalty(shape, group, in_rep, out_rep):
    w = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = ((w - brute_force_project(w, group, in_rep, out_rep)) ** 2).sum()
    loop = bl.EagerGroupLoop(shape, group, in_rep, out_rep)(w)
    torch.testing.assert_close(loop, exact, rtol=1e-12, atol=1e-12)
    dense = bl.DenseBasis(shape, group, in_rep, out_rep, dtype=torch.float64)(w)
    torch.testing.assert_close(dense, exact, rtol=1e-10, atol=1e-10)
    idx, inv = bl.gather_inputs(shape, group, in_rep, out_rep)
    gathered = bl._gather_penalty(w.float(), idx, inv)
    torch.testing.assert_close(gathered.double(), exact, rtol=1e-5, atol=1e-5)


def test_layer_specs_match_the_gcnn_the_training_benchmark_uses():
    widths = (2, 3)
    model = bl.GCNN(widths, in_channels=3, out_channels=None, bias=False)
    shapes = [tuple(item[0].shape) for item in model.penalty_items()]
    assert shapes == [s for s, *_ in bl.gcnn_layer_specs(widths)][:len(shapes)]
