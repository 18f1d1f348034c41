#!/usr/bin/env bash
# GPU check of the kernels: build, the GPU tests of the kernel files, and per-kernel timings.
#
#   OUT=/some/dir bash bench/gpu_check.sh        (run from anywhere; the step timeouts add up to 880 s, the
#   expected total on an H200 is about 5 minutes; where one command may run 600 s at most, split it in two
#   calls: SKIP_TESTS=1 for the build and timings, then SKIP_BUILD=1 SKIP_TIMINGS=1 for the tests;
#   SANITIZE=1 adds compute-sanitizer runs of the steerable CUDA kernels, best in a call of their own)
#
# Logs go to $OUT (build.log, tests*.log, timings*.log, timings*.json).  Each step has its own
# timeout and a failed step does not stop the next one; the exit status is non-zero if any failed.
# Timings: each kernel alone (the op that launches it, no autograd), CUDA events around one call,
# L2 flushed (a 256 MiB write) before each call, median of 20 calls after 3 warm-ups.  "% copy" is
# bytes moved / time / the copy bandwidth measured here (a 1 GiB device-to-device copy, read +
# write): a forward reads W once, a backward reads W and writes dW.  The Triton kernels are timed chunked
# and tiled in the first process (the tiled ones called directly, whatever PROJKERNELS_TILED says); the
# second process, with PROJKERNELS_TILED=1, times the CUDA tiled kernels, and a third, with
# PROJKERNELS_ORBIT_BATCH=1, the chunked CUDA kernels with batched orbit loads.
set -x
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
cd "$ROOT" || exit 1
status=0

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
git log -1 --oneline > "$OUT/commit.txt" 2>&1

if [ -z "${SKIP_BUILD:-}" ]; then  # SKIP_BUILD=1: the extension is already built in place
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PROJKERNELS_CUDA=1 timeout 150 \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || status=1
fi
tail -3 "$OUT/build.log"
python3 -c "import projkernels as pk, projkernels.backends.native as c; print(pk.__file__, 'cuda:', c.WITH_CUDA, pk.available_backends('cuda'))" \
  >> "$OUT/build.log" 2>&1 || status=1

if [ -z "${SKIP_TESTS:-}" ]; then  # SKIP_TESTS=1: timings only
timeout 170 python3 -m pytest -m gpu -x -q --durations=10 tests/test_kernels_tiles.py tests/test_cuda_backend.py \
  tests/test_triton_backend.py tests/test_multi_fused.py > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"
# The steerable CUDA kernels on their own (never run on a GPU before; escnn-free synthetic layouts,
# then the escnn cases where escnn is installed).
timeout 150 python3 -m pytest -m gpu -q --durations=5 tests/test_steerable_ops_synthetic.py tests/test_steerable_native.py \
  > "$OUT/tests-steerable.log" 2>&1 || status=1
tail -5 "$OUT/tests-steerable.log"
# The chunked CUDA kernels with batched orbit loads (opt-in), held to the same tests: the large
# shapes of test_cuda_backend.py (over a million orbits) and the multi-tensor tests batch.
PROJKERNELS_ORBIT_BATCH=1 timeout 120 python3 -m pytest -m gpu -x -q tests/test_cuda_backend.py tests/test_multi_fused.py \
  > "$OUT/tests-batched.log" 2>&1 || status=1
tail -5 "$OUT/tests-batched.log"
# The Triton tiled kernels on their own clock: their first GPU compiles (tl.gather) must not starve the others.
timeout 120 python3 -m pytest -m gpu -x -q --durations=5 tests/test_triton_tiles.py > "$OUT/tests-tiles.log" 2>&1 || status=1
tail -5 "$OUT/tests-tiles.log"
fi

cat > "$OUT/timings.py" <<'PY'
import json, sys
import torch
import projkernels  # noqa: F401  (registers the backends)
from projkernels.backends import native as C
from projkernels.backends.triton import kernels as K
from projkernels.orbits import orbit_table

dev = torch.device("cuda")
flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)


def time_ms(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        flush.fill_(1)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


src = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
copy_gbs = 2 * src.numel() / (time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
del src, dst
import os
# The CUDA tiled run and the batched run time the CUDA kernels only: the Triton numbers come from the first run.
second_run = os.environ.get("PROJKERNELS_TILED") == "1" or os.environ.get("PROJKERNELS_ORBIT_BATCH") == "1"
print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbs:.0f} GB/s; "
      f"PROJKERNELS_TILED={os.environ.get('PROJKERNELS_TILED', '0 (default: chunked)')}; "
      f"PROJKERNELS_ORBIT_BATCH={os.environ.get('PROJKERNELS_ORBIT_BATCH', '0 (default: one orbit at a time)')}")

cases = [("C4 reg 2048x2048x3x3 fp32", (2048, 2048, 3, 3), "C4", "regular", torch.float32),
         ("C4 reg 2048x2048x3x3 bf16", (2048, 2048, 3, 3), "C4", "regular", torch.bfloat16),
         ("D4 reg 1536x1536x3x3 fp32", (1536, 1536, 3, 3), "D4", "regular", torch.float32),
         ("D4 triv 2048x2048x5x5 fp32", (2048, 2048, 5, 5), "D4", "trivial", torch.float32)]
rows = []
for name, shape, group, rep, dtype in cases:
    w = torch.randn(shape, device=dev).to(dtype)
    table = orbit_table(w, group, rep, rep)
    nbytes = w.numel() * w.element_size()
    acc = torch.float32
    gp = torch.tensor(0.5, dtype=acc, device=dev)
    ge = torch.tensor(0.25, dtype=acc, device=dev)
    plan = K.plan_tiles(table, w.element_size())  # None: no block fits a tile (the backend runs chunked)
    kernels = {
        "cuda fwd": (lambda: C.fused_forward(w, table, with_spectrum=False), nbytes),
        "cuda bwd": (lambda: C.fused_backward(w, table, gp, ge), 2 * nbytes),
        "triton fwd": (lambda: K.reduce_orbits(w, table, spectrum=False), nbytes),
        "triton bwd": (lambda: K.apply_orbits(w, table, gp, ge, out_dtype=w.dtype), 2 * nbytes),
        "triton tiled fwd": (lambda: K.reduce_tiles(w, table, plan, spectrum=False), nbytes),
        "triton tiled bwd": (lambda: K.apply_tiles(w, table, plan, gp, ge, out_dtype=w.dtype), 2 * nbytes),
    }
    if plan is not None and not second_run:
        print(f"{name:30s} triton tiles: {plan.blocks_per_tile} blocks, {plan.n_tiles} tiles, "
              f"[{plan.so_p} x {plan.pitch_p}] register tile, {plan.vec}-entry vectors")
    for kname, (fn, moved) in kernels.items():
        if second_run and kname.startswith("triton"):
            continue
        if "tiled" in kname and plan is None:
            print(f"{name:30s} {kname:16s} not tiled (a block does not fit a tile)")
            continue
        try:
            ms = time_ms(fn)
            pct = 100 * moved / (ms * 1e-3) / (copy_gbs * 1e9)
            rows.append(dict(case=name, kernel=kname, ms=ms, pct_copy=pct, mb=nbytes / 1e6))
            print(f"{name:30s} {kname:16s} {ms * 1e3:9.1f} us  {pct:5.1f}% copy")
        except Exception as exc:  # one failing kernel must not hide the others' numbers
            print(f"{name:30s} {kname:16s} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
    del w
    torch.cuda.empty_cache()
json.dump(dict(device=torch.cuda.get_device_name(), copy_gbs=copy_gbs, rows=rows), open(sys.argv[1], "w"), indent=1)
PY
# SANITIZE=1: the steerable CUDA kernels' small synthetic cases (float32) under compute-sanitizer:
# out-of-bounds and misaligned accesses (memcheck), shared-memory races (racecheck), barriers
# (synccheck).  Slow (every CUDA call of the process is instrumented), so opt-in.
if [ -n "${SANITIZE:-}" ]; then
CS="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
for tool in memcheck racecheck synccheck; do
  timeout 150 "$CS" --tool "$tool" --error-exitcode 1 python3 -m pytest -m gpu -q -x \
    tests/test_steerable_ops_synthetic.py -k "float32 and (blocks_q_shared or blocks_global or coefficients or many or mixed)" \
    > "$OUT/sanitizer-$tool.log" 2>&1 || status=1
  tail -4 "$OUT/sanitizer-$tool.log"
done
fi

# The chunked kernels (the default) and the Triton tiled ones, then the CUDA tiled ones
# (PROJKERNELS_TILED=1) for comparison.
if [ -z "${SKIP_TIMINGS:-}" ]; then  # SKIP_TIMINGS=1: build and tests only
timeout 90 python3 "$OUT/timings.py" "$OUT/timings.json" > "$OUT/timings.log" 2>&1 || status=1
cat "$OUT/timings.log"
PROJKERNELS_TILED=1 timeout 40 python3 "$OUT/timings.py" "$OUT/timings-tiled.json" > "$OUT/timings-tiled.log" 2>&1 || status=1
cat "$OUT/timings-tiled.log"
# The chunked CUDA kernels with batched orbit loads (PROJKERNELS_ORBIT_BATCH=1, opt-in until timed):
# compare their rows with the same rows of timings.log, same machine, same minute.
PROJKERNELS_ORBIT_BATCH=1 PROJKERNELS_TILED=0 timeout 40 python3 "$OUT/timings.py" "$OUT/timings-batched.json" \
  > "$OUT/timings-batched.log" 2>&1 || status=1
cat "$OUT/timings-batched.log"
fi
exit $status
