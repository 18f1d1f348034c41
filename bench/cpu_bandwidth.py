"""CPU bandwidth table: forward and forward+backward of the cpp backend as a fraction of copy bandwidth,
at 1 and 2 threads, next to torch.compile of the reference backend's gather and the eager group loop.

    python bench/cpu_bandwidth.py [--quick] [--no-baselines] [--min-time 0.2] [--passes 3] [--out results.md]
    python bench/cpu_bandwidth.py --per-core   # the forward's rate per core by working-set size

%copy: bytes the pass must move (the weight once for the forward; weight, its read again and dW for
forward+backward, 3x) over the time, divided by the bandwidth of a 128 MiB tensor copy (read + write)
measured in the same run with 2 threads.  Every figure is the best of ``passes`` measurements, each the
fastest of its repeats (bench/common.py time_call): on a shared machine other processes only ever add
time.  The load average (uptime) is printed with each row, since that is what the figures depend on.
All ratios come from one run; nothing is asserted about them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402

import projkernels as pk  # noqa: E402

import common as C  # noqa: E402
from common import Case, F32  # noqa: E402

CASES = [
    Case((64, 64, 3, 3), "C4", "regular", "regular", F32),
    Case((128, 128, 3, 3), "C4", "regular", "regular", F32),
    Case((256, 256, 3, 3), "C4", "regular", "regular", F32),
    Case((384, 384, 3, 3), "C4", "regular", "regular", F32),
    Case((768, 768, 3, 3), "C4", "regular", "regular", F32, note="20 MiB target"),
    Case((768, 768, 3, 3), "D4", "regular", "regular", F32),
    Case((768, 192, 3, 3), "C4", "trivial", "regular", F32, note="trivial -> regular"),
    Case((1024, 1024, 5), "D2", "regular", "regular", F32, note="Conv1d"),
    Case((2048, 2048), "D4", "regular", "regular", F32, note="Linear"),
    Case((192, 192, 3, 3, 3), "Oh", "regular", "regular", F32, note="Conv3d"),
]
QUICK = [CASES[0], CASES[4], CASES[6], CASES[8], CASES[9]]


def load() -> str:
    return "%.2f" % os.getloadavg()[0]


def steerable_methods():
    """An SO(2) Linear layer between fields (0, 1, 2, 3) x 32 (escnn field types): (name, nbytes,
    make_input, {method: f}), or None without escnn.  Its baseline is the eager loop over blocks of
    bench/steerable_bench.py; the finite-group gather has no counterpart."""
    try:
        from escnn import group, gspaces, nn as enn  # noqa: F401
    except Exception:  # escnn is optional
        return None
    so2 = group.so2_group(4)
    g0 = gspaces.no_base_space(so2)
    t = enn.FieldType(g0, [so2.irrep(k) for k in range(4)] * 32)
    sym = pk.steerable(t, t, None)
    nbytes = 4 * sym.numel
    s = sym.numel // (sym.weight_shape[0] * sym.weight_shape[1])
    blocks = [(o, o + t.d_out, i, i + t.d_in, t.q.float()) for t in sym.types for o in t.out_fields
              for i in t.in_fields]

    def loop(w):  # the eager loop over blocks of bench/steerable_bench.py (x - Q Q^T x per block)
        wv = w.reshape(w.shape[0], w.shape[1], s)
        pen = 0.0
        for o0, o1, i0, i1, q in blocks:
            x = wv[o0:o1, i0:i1].reshape(-1)
            pen = pen + (x - q @ (q.T @ x)).square().sum()
        return pen

    methods = {"ours:cpp": lambda w: pk.penalty_and_energy(w, sym, backend="cpp")[0], "eager loop": loop}
    return "SO(2) Linear (0,1,2,3)x32 f32", nbytes, lambda: torch.randn(sym.weight_shape), methods


# Working sets from L1 to well past L3 (Zen 3: 32 KiB L1d, 512 KiB L2 per core, 32 MiB L3): C4 regular
# 3x3 float32 weights of 36 KiB to 81 MiB.
PER_CORE_SIZES = [32, 64, 128, 256, 768, 1536]


def cpu_seconds(f, min_time: float, reps: int = 5) -> float:
    """Best over ``reps`` rounds of the CPU time (time.process_time) per call of f, one thread: the
    time the process itself ran, so other processes on the machine change it far less than wall time."""
    best = None
    for _ in range(reps):
        n, t0 = 0, time.process_time()
        while True:
            f()
            n += 1
            t = time.process_time() - t0
            if t >= min_time:
                break
        best = t / n if best is None else min(best, t / n)
    return best


def per_core(min_time: float) -> List[str]:
    """GB/s of weight read per core by the forward (cpp), next to a one-thread copy of the same weight
    (read + write counted), by working-set size: if the forward's rate is the same in L1 as past L3,
    instruction throughput, not memory, is its limit on this machine."""
    torch.set_num_threads(1)
    lines = ["| C4 regular 3x3 float32 | KiB | forward GB/s per core | copy GB/s per core (r+w) | forward / copy | load |",
             "|---|---|---|---|---|---|"]
    for c in PER_CORE_SIZES:
        w = torch.randn(c, c, 3, 3)
        dst = torch.empty_like(w)
        nbytes = w.numel() * 4
        f = lambda: pk.penalty_and_energy(w, "C4", "regular", "regular", backend="cpp")  # noqa: E731
        f()
        tf = cpu_seconds(f, min_time)
        tc = cpu_seconds(lambda: dst.copy_(w), min_time)
        gf, gc = nbytes / tf / 1e9, 2 * nbytes / tc / 1e9
        lines.append(f"| {c}x{c}x3x3 | {nbytes // 1024} | {gf:.2f} | {gc:.2f} | {gf / gc:.2f} | {load()} |")
        print(lines[-1], flush=True)
    torch.set_num_threads(2)
    return lines


def measure(f, make_input, min_time, passes):
    best = (None, None)
    for _ in range(passes):
        fwd, both = C.fwd_and_fwdbwd(f, make_input, "cpu", min_time=min_time)
        best = (fwd if best[0] is None else min(best[0], fwd), both if best[1] is None else min(best[1], both))
    return best


def _row(case, note, nbytes, name, res, copy_bw):
    (f1, b1), (f2, b2) = res[1], res[2]
    ms = lambda t: "-" if t is None else f"{t * 1e3:.2f}"  # noqa: E731
    pc = lambda n, t: "-" if t is None else f"{100 * n * nbytes / t / copy_bw:.0f}%"  # noqa: E731
    sp = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
    return (f"| {case}{' (' + note + ')' if note else ''} | {nbytes / 2 ** 20:.1f} | {name} | {ms(f1)} | {ms(f2)} "
            f"| {pc(1, f2)} | {ms(b1)} | {ms(b2)} | {pc(3, b2)} | {sp(f1, f2)} | {sp(b1, b2)} | {load()} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="five cases")
    ap.add_argument("--no-baselines", action="store_true", help="only the cpp backend")
    ap.add_argument("--cases", default=None,
                    help="comma list of case numbers (0-based, in CASES' order) to run; 'steerable' for its row")
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--per-core", action="store_true",
                    help="only the forward's per-core rate by working-set size (CPU time, one thread), beside a copy")
    args = ap.parse_args(argv)
    if args.per_core:
        lines = [f"CPU: {C.cpu_name()}, torch {torch.__version__}; load {load()} at the start.", ""]
        print("\n".join(lines), flush=True)
        lines += per_core(args.min_time)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write("\n".join(lines) + "\n")
        return

    torch.set_num_threads(2)
    copy_bw = C.copy_bandwidth("cpu")
    torch.set_num_threads(1)
    copy_bw1 = C.copy_bandwidth("cpu")
    lines = [f"CPU: {C.cpu_name()}, torch {torch.__version__}, copy bandwidth (128 MiB, read + write) "
             f"{copy_bw / 1e9:.1f} GB/s at 2 threads, {copy_bw1 / 1e9:.1f} GB/s at 1; load {load()} at the start.", "",
             "| case | MiB | method | fwd ms 1t | fwd ms 2t | fwd %copy 2t | f+b ms 1t | f+b ms 2t | f+b %copy 2t "
             "| 2t/1t fwd | 2t/1t f+b | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    picked = None if args.cases is None else [c.strip() for c in args.cases.split(",") if c.strip()]
    cases = QUICK if args.quick else CASES
    if picked is not None:
        cases = [CASES[int(c)] for c in picked if c != "steerable"]
    for case in cases:
        methods = C.layer_methods(case, "cpu")
        names = ["ours:cpp"] + ([] if args.no_baselines else ["compile(gather)", "eager loop"])
        for name in names:
            f = methods[name]
            res = {}
            for th in (1, 2):
                torch.set_num_threads(th)
                try:
                    res[th] = measure(f, lambda: case.weight("cpu"), args.min_time, args.passes)
                except Exception as e:  # a baseline that cannot run is reported, not fatal
                    res[th] = (None, None)
                    print(f"  {case.name} {name}: {type(e).__name__}: {e}"[:200], file=sys.stderr)
            row = _row(case.name, case.note, case.nbytes, name, res, copy_bw)
            lines.append(row)
            print(row, flush=True)
    st = steerable_methods() if picked is None or "steerable" in picked else None
    if st is not None:
        name_, nbytes, make, methods = st
        for name, f in methods.items():
            if args.no_baselines and name != "ours:cpp":
                continue
            res = {}
            for th in (1, 2):
                torch.set_num_threads(th)
                res[th] = measure(f, make, args.min_time, args.passes)
            row = _row(name_, "", nbytes, name, res, copy_bw)
            lines.append(row)
            print(row, flush=True)
    torch.set_num_threads(2)
    lines += ["", f"Load {load()} at the end."]
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
