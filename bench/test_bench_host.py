"""Host cost of the public API on tiny weights, against the native ops (CPU, one thread).

Run with ``pytest bench/test_bench_host.py --benchmark-group-by=group``; each group pairs a call of
ours with its native baseline (bench/host.py prints the ratios).  Timings are reported, never asserted.
"""
import pytest
import torch

import projkernels as pk

import host

SPEC = host.SPEC


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(host.SHAPE, generator=g).requires_grad_() for _ in range(host.N_WEIGHTS)]


@pytest.mark.benchmark(group="host: forward")
@pytest.mark.parametrize("which", ["native (w*w).sum()", "projected_penalty"])
def test_forward(benchmark, weights, which):
    w = weights[0]
    fn = (lambda: (w * w).sum()) if which.startswith("native") else (lambda: pk.projected_penalty(w, *SPEC))
    benchmark(fn)


@pytest.mark.benchmark(group="host: forward+backward")
@pytest.mark.parametrize("which", ["native grad((w*w).sum())", "projected_penalty"])
def test_forward_backward(benchmark, weights, which):
    w = weights[:1]
    if which.startswith("native"):
        benchmark(lambda: torch.autograd.grad((w[0] * w[0]).sum(), w))
    else:
        benchmark(lambda: torch.autograd.grad(pk.projected_penalty(w[0], *SPEC), w))


@pytest.mark.benchmark(group="host: 20 weights forward+backward")
@pytest.mark.parametrize("which", ["native, one weight", "native, 20 weights", "multi_penalty"])
def test_multi(benchmark, weights, which):
    one = weights[:1]
    items = [(w, *SPEC) for w in weights]
    if which == "native, one weight":
        benchmark(lambda: torch.autograd.grad((one[0] * one[0]).sum(), one))
    elif which == "native, 20 weights":
        benchmark(lambda: torch.autograd.grad(sum((w * w).sum() for w in weights), weights))
    else:
        benchmark(lambda: torch.autograd.grad(pk.multi_penalty(items)[0], weights))


@pytest.mark.benchmark(group="host: bench model forward+backward")
@pytest.mark.parametrize("which", ["native, model parameters", "model_penalty"])
def test_model(benchmark, which):
    model = host.bench_model()
    params = [m.weight for m in model] + [m.bias for m in model if pk.get_symmetry(m).out_rep == "regular"]
    if which == "model_penalty":
        benchmark(lambda: torch.autograd.grad(pk.model_penalty(model), params))
    else:
        benchmark(lambda: torch.autograd.grad(sum((p * p).sum() for p in params), params))
