"""First-call cost: time and peak memory of the first penalty, and of the first spectrum, per group order.

The first call with a new (shape, group, reps) validates the arguments, builds the orbit table and,
for a native backend, uploads it; the spectrum's first call also builds the group's isotypic basis.
Each case runs in a fresh interpreter (``python bench/first_call.py --case ...``), so nothing is
cached from an earlier case, and reports:

- ``import``: seconds to import projkernels (paid once per process, not per configuration);
- ``first``: seconds of the first call, ``second``: of the same call again (the cached path);
- ``peak MiB``: the process's peak resident memory after the call (ru_maxrss), and ``extra MiB``:
  its growth over the peak before the call, which is what the call itself allocated at most.

Usage:

    python bench/first_call.py                 # every case, a markdown table on stdout
    python bench/first_call.py --backend reference
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# (label, shape, group, in_rep, out_rep): a 512x512 Linear between regular fields, and an 8x8 one.
CASES = [(f"{g} 512x512", (512, 512), g, "regular", "regular")
         for g in ("C4", "C8", "C16", "C64", "D32", "C256", "C512", "D256")]
CASES += [("C4 8x8", (8, 8), "C4", "regular", "regular"), ("D4 8x8", (8, 8), "D4", "regular", "regular"),
          ("C8 8x8", (8, 8), "C8", "regular", "regular")]


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(shape, group, in_rep, out_rep, what, backend) -> dict:
    t0 = time.perf_counter()
    import torch
    import projkernels as pk
    t_import = time.perf_counter() - t0
    torch.set_num_threads(1)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    fn = pk.projected_penalty if what == "penalty" else pk.spectrum
    before = _maxrss_mib()
    t0 = time.perf_counter()
    fn(w, group, in_rep, out_rep, backend=backend)
    first = time.perf_counter() - t0
    after = _maxrss_mib()
    t0 = time.perf_counter()
    fn(w, group, in_rep, out_rep, backend=backend)
    second = time.perf_counter() - t0
    return dict(import_s=t_import, first_s=first, second_s=second, peak_mib=after, extra_mib=after - before)


def _spawn(case, what, backend, timeout) -> dict:
    label, shape, group, ir, orr = case
    cmd = [sys.executable, __file__, "--case", json.dumps([list(shape), group, ir, orr]), "--what", what,
           "--backend", backend]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout} s")
    except subprocess.CalledProcessError as e:
        return dict(error=e.stderr.strip().splitlines()[-1] if e.stderr else f"exit {e.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per case")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--what", default="penalty", choices=("penalty", "spectrum"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        shape, group, ir, orr = json.loads(args.case)
        print(json.dumps(run_case(tuple(shape), group, ir, orr, args.what, args.backend)))
        return
    print(f"backend={args.backend}; each cell: one fresh process")
    print()
    print("| case | call | first s | second s | peak MiB | extra MiB | import s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for case in CASES:
        for what in ("penalty", "spectrum"):
            r = _spawn(case, what, args.backend, args.timeout)
            if "error" in r:
                print(f"| {case[0]} | {what} | {r['error']} | | | | |")
            else:
                print(f"| {case[0]} | {what} | {r['first_s']:.4f} | {r['second_s']:.5f} | {r['peak_mib']:.0f} | "
                      f"{r['extra_mib']:.1f} | {r['import_s']:.2f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
