"""Loads the CMake-built projkernels_C library and checks its CPU ops on hand-computed values.

Usage: python check_ops_library.py path/to/libprojkernels_ops.so  (exit status 0 on success).
The weight is a 1x1x2x2 kernel under C4: one free orbit, whose cycle (0,0) -> (0,1) -> (1,1) ->
(1,0) reads 1, 2, 3, 6, so the C4 orbit math of tests/cpp/test_orbit_math.cpp
applies: penalty 14, energy 36, spectrum (36, 10, 4), P(W) = 3 everywhere.
"""
import math
import sys

import torch

torch.ops.load_library(sys.argv[1])
ops = torch.ops.projkernels_C

w = torch.tensor([[[[1.0, 2.0], [6.0, 3.0]]]], dtype=torch.float64)
offsets = torch.tensor([[0, 1, 3, 2]], dtype=torch.int32)  # cycle 0 -> 1 -> 3 -> 2 in flat indices
inv_stab = torch.tensor([1.0], dtype=torch.float64)
s = math.sqrt(0.5)
basis = torch.tensor([[0.5, 0.5, 0.5, 0.5], [s, 0, -s, 0], [0, s, 0, -s], [0.5, -0.5, 0.5, -0.5]],
                     dtype=torch.float64)
row_irrep = torch.tensor([0, 1, 1, 2], dtype=torch.int64)
geom = (1, 1, 4, 4)  # c_out, c_in, stride_out, stride_in

failures = []


def check(name, got, expected, tol=1e-12):
    if not torch.allclose(got.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=tol, atol=tol):
        failures.append(f"{name}: got {got.tolist()}, expected {expected}")


for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
    pen, eq, spec = ops.fused_forward(w.to(dtype), offsets, inv_stab, basis, row_irrep, 3, *geom)
    check(f"penalty[{dtype}]", pen, 14.0, 1e-6)
    check(f"eq_energy[{dtype}]", eq, 36.0, 1e-6)
    check(f"spectrum[{dtype}]", spec, [36.0, 10.0, 4.0], 1e-6)
    proj = ops.fused_backward(w.to(dtype), torch.tensor(0.0), torch.tensor(0.5), offsets, inv_stab, *geom)
    check(f"project[{dtype}]", proj, torch.full_like(w, 3.0).tolist(), 1e-6)
    if proj.dtype != dtype:
        failures.append(f"project[{dtype}] returned {proj.dtype}")

grad = ops.fused_backward(w, torch.tensor(0.5), torch.tensor(0.25), offsets, inv_stab, *geom)
check("gradient", grad, (w - 3 + 0.5 * 3).tolist())  # 2*0.5*(w - 3) + 2*0.25*3

try:
    ops.fused_forward(w.int(), offsets, inv_stab, basis, row_irrep, 3, *geom)
    failures.append("an int32 weight was accepted")
except RuntimeError as exc:
    if "weight must be float16, bfloat16, float32 or float64" not in str(exc):
        failures.append(f"unexpected error message: {exc}")

if failures:
    print("\n".join(failures))
    sys.exit(1)
print("projkernels_C ops library: all checks passed")
