"""Single-layer penalty: our backends against the eager loop, torch.compile and the dense basis.

Run with ``pytest bench/`` (add ``--large`` for the >= 64 MB weights); compare with
``--benchmark-group-by=group``.  Timings are reported, never asserted.
"""
import functools

import pytest
import torch

import common as C

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = C.selected_cases(C.large_requested())


@functools.lru_cache(maxsize=4)
def _methods(case):
    return C.layer_methods(case, DEVICE)


def _method_names():
    names = [f"ours:{b}" for b in C.our_backends(DEVICE)] + ["eager loop", "compile(gather)", "dense basis"]
    return names


def _rounds(case):
    return max(3, min(50, int(2e7 // max(case.numel, 1))))


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", _method_names())
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_layer(benchmark, case, method, phase):
    methods = _methods(case)
    if method not in methods:
        pytest.skip(f"{method} is not run for {case.name}")
    f = methods[method]
    w = case.weight(DEVICE)
    if phase == "fwd":
        def call():
            with torch.no_grad():
                f(w)
            C.sync(DEVICE)
    else:
        w.requires_grad_(True)

        def call():
            torch.autograd.grad(f(w), [w])
            C.sync(DEVICE)
    benchmark.group = f"{case.name} {phase}"
    benchmark.extra_info.update(bytes=case.nbytes * (1 if phase == "fwd" else 3), numel=case.numel)
    benchmark.pedantic(call, rounds=_rounds(case), warmup_rounds=1, iterations=1)


def test_copy_bandwidth(benchmark):
    n = (512 if DEVICE.type == "cuda" else 128) * 2 ** 20 // 4
    src = torch.rand(n, device=DEVICE)
    dst = torch.empty_like(src)

    def call():
        dst.copy_(src)
        C.sync(DEVICE)
    benchmark.group = "copy bandwidth"
    benchmark.extra_info["bytes"] = 2 * src.numel() * src.element_size()
    benchmark.pedantic(call, rounds=10, warmup_rounds=1, iterations=1)
