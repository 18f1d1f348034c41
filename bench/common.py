"""Cases, methods and timers shared by ``bench/run.py`` and the pytest-benchmark files."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

import projkernels as pk
from projkernels.dispatch.multi import multi_penalty

import baselines as bl

LARGE_ENV = "PROJKERNELS_BENCH_LARGE"


def large_requested() -> bool:
    return os.environ.get(LARGE_ENV, "") not in ("", "0")


# --- cases -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    shape: Tuple[int, ...]
    group: str
    in_rep: str
    out_rep: str
    dtype: torch.dtype
    large: bool = False
    note: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def name(self) -> str:
        reps = "reg" if self.in_rep == self.out_rep == "regular" else (
            "triv" if self.in_rep == self.out_rep == "trivial" else f"{self.in_rep[:3]}>{self.out_rep[:3]}")
        return f"{self.group} {reps} {'x'.join(map(str, self.shape))} {self.dtype_name}"

    def weight(self, device, seed=0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.shape, generator=g).to(device=device, dtype=self.dtype)


F32, BF16 = torch.float32, torch.bfloat16
TARGET_CASE = Case((384, 384, 3, 3), "C4", "regular", "regular", F32, note="CPU target (as stated: 384x384x3x3)")
TARGET_CASE_21MB = Case((768, 768, 3, 3), "C4", "regular", "regular", F32, note="CPU target (21 MB reading)")

CASES: List[Case] = [
    Case((64, 64, 3, 3), "C4", "regular", "regular", F32, note="16 fields"),
    Case((64, 64, 3, 3), "C4", "regular", "regular", BF16),
    Case((128, 128, 3, 3), "C4", "regular", "regular", F32),
    Case((256, 256, 3, 3), "C4", "regular", "regular", F32),
    TARGET_CASE,
    Case((384, 384, 3, 3), "C4", "regular", "regular", BF16),
    TARGET_CASE_21MB,
    Case((256, 256, 3, 3), "C4", "trivial", "trivial", F32),
    Case((128, 128, 3, 3), "D4", "regular", "regular", F32, note="16 fields"),
    Case((768, 768, 3, 3), "D4", "regular", "regular", F32),
    Case((768, 768, 3, 3), "D4", "regular", "regular", BF16),
    Case((256, 256, 5, 5), "D4", "trivial", "trivial", F32),
    # >= 64 MB weight sets; opt in with --large / PROJKERNELS_BENCH_LARGE=1.
    Case((1536, 1536, 3, 3), "C4", "regular", "regular", F32, large=True),
    Case((2048, 2048, 3, 3), "C4", "regular", "regular", F32, large=True),
    Case((2048, 2048, 3, 3), "C4", "regular", "regular", BF16, large=True),
    Case((1536, 1536, 3, 3), "D4", "regular", "regular", F32, large=True),
]

# Conv3d under the cube groups (``python bench/run.py --conv3d``): Oh's 48-channel regular fields with a
# 3x3x3 kernel, and O on scalar (trivial) channels with a 5x5x5 kernel.  CPU-sized.
CONV3D_CASES: List[Case] = [
    Case((96, 96, 3, 3, 3), "Oh", "regular", "regular", F32, note="Conv3d, 2 regular fields of 48"),
    Case((192, 192, 3, 3, 3), "Oh", "regular", "regular", F32, note="Conv3d, 4 regular fields of 48"),
    Case((192, 192, 3, 3, 3), "Oh", "regular", "regular", BF16, note="Conv3d"),
    Case((64, 64, 5, 5, 5), "O", "trivial", "trivial", F32, note="Conv3d, scalar channels"),
    Case((128, 128, 5, 5, 5), "O", "trivial", "trivial", F32, note="Conv3d, scalar channels"),
]
CASES = CASES + CONV3D_CASES

# The series drawn in the plot (time vs weight size).

DENSE_MAX_NUMEL = 40_000  # a dense N x D basis beyond this does not fit a laptop-sized budget


def selected_cases(large: bool) -> List[Case]:
    return [c for c in CASES if large or not c.large]


# 20 conv layers: a lifting conv, 18 regular->regular convs, a 1x1 head.
MODEL_WIDTHS = [16] * 7 + [32] * 6 + [48] * 6
MODEL_WIDTHS_LARGE = [32] * 7 + [64] * 6 + [96] * 6


def model_specs(large: bool):
    return bl.gcnn_layer_specs(MODEL_WIDTHS_LARGE if large else MODEL_WIDTHS)


# --- methods -----------------------------------------------------------------------------------

def our_backends(device) -> List[str]:
    names = pk.available_backends(device)
    if torch.device(device).type == "cpu":
        names = [n for n in names if n != "triton"]  # the Triton interpreter is a debugging aid, not a CPU path
    return names


def layer_methods(case: Case, device, *, with_compiled_loop: bool = False) -> Dict[str, Callable]:
    """name -> f(weight) -> penalty, for one layer."""
    spec = (case.group, case.in_rep, case.out_rep)
    out: Dict[str, Callable] = {}
    for b in our_backends(device):
        out[f"ours:{b}"] = lambda w, b=b: pk.penalty_and_energy(w, *spec, backend=b)[0]
    loop = bl.EagerGroupLoop(case.shape, *spec, device=device)
    out["eager loop"] = loop
    idx, inv = bl.gather_inputs(case.shape, *spec, device=device)
    gather = bl.compiled_gather_penalty()
    out["compile(gather)"] = lambda w: gather(w, idx, inv)
    if with_compiled_loop:
        out["compile(loop)"] = bl.compiled_group_loop(loop)
    if case.numel <= DENSE_MAX_NUMEL and case.dtype == F32:
        dense = bl.DenseBasis(case.shape, *spec, device=device, dtype=case.dtype)
        out["dense basis"] = dense
    return out


def model_methods(specs, device) -> Dict[str, Callable]:
    """name -> f(list of weights) -> total penalty, for a whole model."""
    out: Dict[str, Callable] = {}
    out["multi:auto"] = lambda ws: multi_penalty([(w, *s[1:]) for w, s in zip(ws, specs)])[0]
    for b in our_backends(device):
        out[f"multi:{b}"] = lambda ws, b=b: multi_penalty([(w, *s[1:]) for w, s in zip(ws, specs)], backend=b)[0]
        out[f"{len(specs)} single:{b}"] = lambda ws, b=b: sum(
            pk.penalty_and_energy(w, *s[1:], backend=b)[0] for w, s in zip(ws, specs))
    loops = [bl.EagerGroupLoop(s[0], *s[1:], device=device) for s in specs]
    out["eager loop"] = lambda ws: sum(l(w) for l, w in zip(loops, ws))
    inputs = [bl.gather_inputs(s[0], *s[1:], device=device) for s in specs]
    idxs, invs = [i for i, _ in inputs], [v for _, v in inputs]
    many = bl.compiled_gather_penalty(many=True)
    out["compile(gather)"] = lambda ws: many(ws, idxs, invs)
    return out


def model_weights(specs, device, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s[0], generator=g) * 0.05).to(device=device, dtype=dtype) for s in specs]


# --- timing ------------------------------------------------------------------------------------

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device, *, min_time: float = 0.25, max_reps: int = 50,
              min_reps: int = 5) -> float:
    """Seconds per call after two warm-up calls (where torch.compile compiles).

    GPU: the median of triton's do_bench (or CUDA events).  CPU: the fastest of the repeats, since
    on a shared machine other processes only ever add time to a call.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton.testing
            # do_bench clears L2 between calls, so a working set above L2 is read from memory.
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except ImportError:
            return _cuda_event_time(fn)
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _cuda_event_time(fn, reps: int = 50) -> float:
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def fwd_and_fwdbwd(f: Callable, make_input: Callable[[], object], device, **kw) -> Tuple[float, float]:
    """(forward seconds, forward+backward seconds) of f(x) -> scalar."""
    x = make_input()
    with torch.no_grad():
        t_fwd = time_call(lambda: f(x), device, **kw)
    xs = x if isinstance(x, list) else [x]
    for t in xs:
        t.requires_grad_(True)
    t_both = time_call(lambda: torch.autograd.grad(f(x), xs), device, **kw)
    return t_fwd, t_both


def copy_bandwidth(device) -> float:
    """Bytes per second of a large tensor copy (read + write counted)."""
    n = (512 if torch.device(device).type == "cuda" else 128) * 2 ** 20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, min_time=0.5)
    return 2 * src.numel() * src.element_size() / t


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess where that is not readable)."""
    name = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def device_info(device) -> Dict[str, str]:
    device = torch.device(device)
    info = {"device": str(device), "torch": torch.__version__, "threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = cpu_name()
        info["cores"] = str(os.cpu_count())
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


# --- a training step with and without a regulariser --------------------------------------------

TRAIN_FIELDS = (16, 16, 16, 16)
TRAIN_BATCH, TRAIN_SIZE = 8, 32


def training_step(regulariser: str, device, *, lam: float = 1e-2, fields=TRAIN_FIELDS,
                  batch: int = TRAIN_BATCH, size: int = TRAIN_SIZE):
    """One SGD step of a C4 G-CNN on a regression target: task loss, plus nothing / the projection
    penalty of every conv (multi_penalty) / the sample-based loss with one sampled rotation."""
    if regulariser not in ("none", "projection", "sample"):
        raise ValueError(f"regulariser: expected 'none', 'projection' or 'sample', got {regulariser!r}")
    torch.manual_seed(0)
    model = bl.GCNN(fields, in_channels=3, out_channels=None, bias=False).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randn(batch, model.order * fields[-1], size, size, device=device)
    items = model.penalty_items()

    def step():
        opt.zero_grad(set_to_none=True)
        y = model(x)
        loss = (y - target).square().mean()
        if regulariser == "projection":
            loss = loss + lam * multi_penalty(items)[0]
        elif regulariser == "sample":
            loss = loss + lam * bl.sample_equivariance_loss(model, x, y)
        loss.backward()
        opt.step()
        sync(device)
    return step
