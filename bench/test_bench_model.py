"""Whole-model penalty (20 conv layers) and the added cost per training step.

multi_penalty against 20 single calls, the eager loop and torch.compile of the gather code; and
the projection penalty against the sample-based regulariser ||f(g x) - g f(x)||^2 on a small C4
G-CNN of plain Conv2d layers.
"""
import functools

import pytest
import torch

import common as C

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPECS = C.model_specs(C.large_requested())


@functools.lru_cache(maxsize=1)
def _methods():
    return C.model_methods(SPECS, DEVICE)


def _names():
    names = ["multi:auto"]
    for b in C.our_backends(DEVICE):
        names += [f"multi:{b}", f"{len(SPECS)} single:{b}"]
    return names + ["eager loop", "compile(gather)"]


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", _names())
def test_model(benchmark, method, phase):
    f = _methods()[method]
    ws = C.model_weights(SPECS, DEVICE)
    if phase == "fwd":
        def call():
            with torch.no_grad():
                f(ws)
            C.sync(DEVICE)
    else:
        for w in ws:
            w.requires_grad_(True)

        def call():
            torch.autograd.grad(f(ws), ws)
            C.sync(DEVICE)
    benchmark.group = f"{len(SPECS)}-layer model {phase}"
    benchmark.pedantic(call, rounds=10, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("regulariser", ["none", "projection", "sample"])
def test_training_step(benchmark, regulariser):
    step = C.training_step(regulariser, DEVICE)
    benchmark.group = "training step"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
