"""One equivariance-decay step over the 20-layer bench model, against model_penalty forward+backward
and torch._foreach_mul_ over the same weights (CPU: 1 thread).  ``bench/decay_bench.py`` prints the
same comparison as a table of ratios."""
import functools

import pytest
import torch

import common as C
import decay_bench as DB

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = "large" if C.large_requested() else "default"
NAMES = ["decay step (decoupled)", "decay step (coupled)", "decay op only", "model_penalty fwd+bwd",
         "torch._foreach_mul_"]


@functools.lru_cache(maxsize=None)
def _methods(size):
    return DB.methods(DB.build_model(DB.model_specs(size), DEVICE), DEVICE)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("size", [SIZE, "tiny"])
@pytest.mark.parametrize("method", NAMES)
def test_decay_step(benchmark, one_thread, method, size):
    fn = _methods(size)[method]

    def call():
        fn()
        C.sync(DEVICE)
    benchmark.group = f"decay step, {size} 20-layer model"
    benchmark.pedantic(call, rounds=20, warmup_rounds=2, iterations=1)
