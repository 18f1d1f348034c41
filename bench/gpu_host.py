"""Host cost of the API on a GPU: host-queued time per call vs the GPU time of the same call.

    python bench/gpu_host.py .        (CHECK_DEVICE=cpu for a dry run)

Ends with a torch.profiler table of one multi_penalty forward+backward over the 20-layer model
(host-side self time per op, launches included), so that a host cost above the single-weight
path's can be attributed op by op; PROFILE_ONLY=1 prints that table alone.
"""
import os
import sys
import time
import warnings

import torch

proj = os.path.abspath(sys.argv[1])
sys.path.insert(0, os.path.join(proj, "bench"))
sys.path.insert(1, proj)
import common as C  # noqa: E402
import projkernels as pk  # noqa: E402

dev = torch.device(os.environ.get("CHECK_DEVICE", "cuda"))
gpu = dev.type == "cuda"


def sync():
    if gpu:
        torch.cuda.synchronize()


def host_us(fn, n=300):
    for _ in range(10):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n * 1e6


def gpu_us(fn, n=50):
    if not gpu:
        return float("nan")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    try:
        with torch.cuda.graph(g):
            fn()
    except Exception as exc:  # not capturable: report it, no GPU time
        print("   (not capturable:", type(exc).__name__, str(exc)[:120], ")")
        return float("nan")
    for _ in range(3):
        g.replay()
    sync()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        g.replay()
    b.record()
    sync()
    return a.elapsed_time(b) / n * 1e3


def n_syncs(fn):
    if not gpu:
        return 0
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        fn()
        sync()
    torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in ws)


def profile_multi(backend: str, n: int = 20):
    """torch.profiler over n multi_penalty forward+backward calls: ops sorted by host self time."""
    from torch.profiler import ProfilerActivity, profile
    specs = C.model_specs(False)
    ws = [w.requires_grad_(True) for w in C.model_weights(specs, dev)]
    items = [(w, *s[1:]) for w, s in zip(ws, specs)]

    def step():
        return torch.autograd.grad(pk.multi_penalty(items, backend=backend)[0], ws)

    for _ in range(5):
        step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync()
    print(f"profile: multi_penalty fwd+bwd, 20 layers, backend={backend}, {n} calls (times are totals over the calls)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


if os.environ.get("PROFILE_ONLY"):
    profile_multi("cuda" if gpu else "cpp")
    sys.exit(0)

rows = []


def row(name, fn, base=None):
    h = host_us(fn)
    g = gpu_us(fn)
    s = n_syncs(fn)
    rows.append((name, h, g, s))
    ratio = f"{h / base:6.2f}x native" if base else ""
    print(f"{name:62s} host {h:8.1f} us  graph-replay GPU {g:8.1f} us  syncs {s}  {ratio}", flush=True)
    return h


print(torch.cuda.get_device_name() if gpu else "cpu", torch.__version__, pk.available_backends(dev))
for shape in [(8, 8, 3, 3), (64, 64, 3, 3), (768, 768, 3, 3)]:
    w = torch.randn(shape, device=dev, requires_grad=True)
    nf = row(f"native (w*w).sum() fwd {shape}", lambda: (w.detach() * w.detach()).sum())
    nfb = row(f"native autograd.grad((w*w).sum()) {shape}", lambda: torch.autograd.grad((w * w).sum(), [w]))
    for b in ("cuda", "triton") if gpu else ("cpp",):
        row(f"projected_penalty fwd {shape} {b}", lambda: pk.projected_penalty(w.detach(), "C4", "regular", "regular", backend=b), nf)
        row(f"projected_penalty fwd+bwd {shape} {b}",
            lambda: torch.autograd.grad(pk.projected_penalty(w, "C4", "regular", "regular", backend=b), [w]), nfb)

for large in (False, True):
    specs = C.model_specs(large)
    ws = [w.requires_grad_(True) for w in C.model_weights(specs, dev)]
    items = [(w, *s[1:]) for w, s in zip(ws, specs)]
    nat = row(f"native 20-weight sum((w*w).sum()) fwd+bwd large={large}",
              lambda: torch.autograd.grad(sum((w * w).sum() for w in ws), ws))
    for b in ("cuda", "triton") if gpu else ("cpp",):
        row(f"multi_penalty fwd+bwd 20 layers large={large} {b}",
            lambda: torch.autograd.grad(pk.multi_penalty(items, backend=b)[0], ws), nat)
# A whole training step (bench/common.py training_step: it synchronises at its end, so the time per
# step is its wall time); the penalty's share is measured against the same step without it.
for cfg in ({}, {"fields": (32, 32, 32, 32), "batch": 32, "size": 64}):
    base = host_us(C.training_step("none", dev, **cfg), n=100)
    pen = host_us(C.training_step("projection", dev, **cfg), n=100)
    print(f"training step {cfg or 'default'}: none {base / 1e3:.3f} ms, with the projection penalty "
          f"{pen / 1e3:.3f} ms (+{100 * (pen - base) / base:.1f}%)", flush=True)
profile_multi("cuda" if gpu else "cpp")
print("done")
