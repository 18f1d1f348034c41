"""Steerable symmetries: the block route against a dense orthonormal basis and an eager block loop.

    python bench/steerable_bench.py                 # CPU, 1 thread, default sizes
    python bench/steerable_bench.py --device cuda   # GPU (adds the Triton route)
    python bench/steerable_bench.py --small         # tiny sizes (a smoke run)
    python bench/steerable_bench.py --backend cpp   # the block route through another backend

For each layer (escnn field types on SO(3) / O(3) conv3d, SO(2) conv2d, the band-limited C4
regular conv2d, an SO(2) Linear) it times forward + backward of the penalty, float32:

- block (ours): ``penalty_and_energy(w, steerable(...))``, by default the reference route on CPU
  (batched matmuls per block type) and the Triton route on CUDA; ``--backend`` names another
  (``cpp`` / ``cuda``: the compiled ops);
- dense Q: one N x D orthonormal basis of the whole equivariant space, resident on the device
  (which favours it), with the cheap formula ``||w||^2 - ||Q^T w||^2`` (one matrix-vector product
  forward, one backward);
- eager block loop: a Python loop over every (output field, input field) block, each projected by
  its Q_t: the same arithmetic as ours, one small op per block.

A last column times the finite-group penalty (C4 group average, regular -> regular, backend
"auto") of a Conv2d weight of about the same size, the cost the steerable route is measured against.
It reports times, ratios and memory (the dense Q against the Q_t of all block types).  ``main()``
prints the table and returns the rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402

import projkernels as pk  # noqa: E402

import common as C  # noqa: E402


def layers(small: bool):
    """name -> (in_type, out_type, kernel_size): each layer at a size where the dense Q fits and at a
    larger one (where, by default, only its memory is reported)."""
    from escnn import group, gspaces, nn as enn
    g3 = gspaces.rot3dOnR3()
    go3 = (getattr(gspaces, "fullRot3dOnR3", None) or gspaces.flipRot3dOnR3)()
    g2 = gspaces.rot2dOnR2(-1)
    c4 = gspaces.rot2dOnR2(4)
    so2 = group.so2_group(4)
    g0 = gspaces.no_base_space(so2)
    out = {}
    for n in ((1,) if small else (2, 4)):
        t = [g3.irrep(0), g3.irrep(1), g3.irrep(2)] * n
        out[f"SO(3) conv3d k=5, fields (0,1,2)x{n}"] = (enn.FieldType(g3, t), enn.FieldType(g3, t), 5)
    for n in ((1,) if small else (2,)):
        t = [go3.irrep(0, 0), go3.irrep(1, 1), go3.irrep(0, 2)] * n
        out[f"O(3) conv3d k=5, fields (0+,1-,2+)x{n}"] = (enn.FieldType(go3, t), enn.FieldType(go3, t), 5)
    for n in ((2,) if small else (4, 8)):
        t = [g2.irrep(0), g2.irrep(1), g2.irrep(2), g2.irrep(3)] * n
        out[f"SO(2) conv2d k=5, fields (0,1,2,3)x{n}"] = (enn.FieldType(g2, t), enn.FieldType(g2, t), 5)
    for n in ((4,) if small else (8, 16)):
        t = [c4.regular_repr] * n
        out[f"C4 band-limited conv2d k=5, {n} regular fields"] = (enn.FieldType(c4, t), enn.FieldType(c4, t), 5)
    for n in ((4,) if small else (16, 32)):
        t = [so2.irrep(k) for k in range(4)] * n
        out[f"SO(2) Linear, fields (0,1,2,3)x{n}"] = (enn.FieldType(g0, t), enn.FieldType(g0, t), None)
    return out


def _dense_fn(w, q):
    def run():
        x = w.reshape(-1)
        pen = x.square().sum() - (q.T @ x).square().sum()
        pen.backward()
        w.grad = None
    return run


def _loop_fn(w, sym):
    blocks = []
    s = sym.numel // (sym.weight_shape[0] * sym.weight_shape[1])
    for t in sym.types:
        q = t.q.to(device=w.device, dtype=w.dtype)
        for o in t.out_fields:
            for i in t.in_fields:
                blocks.append((o, o + t.d_out, i, i + t.d_in, q))

    def run():
        wv = w.reshape(w.shape[0], w.shape[1], s)
        pen = 0.0
        for o0, o1, i0, i1, q in blocks:
            x = wv[o0:o1, i0:i1].reshape(-1)
            pen = pen + (x - q @ (q.T @ x)).square().sum()
        pen.backward()
        w.grad = None
    return run


def _finite_fn(w):
    def run():
        pen, eq = pk.penalty_and_energy(w, "C4", "regular", "regular")
        pen.backward()
        w.grad = None
    return run


def _ours_fn(w, sym, backend):
    def run():
        pen, eq = pk.penalty_and_energy(w, sym, backend=backend)
        pen.backward()
        w.grad = None
    return run


def _ms(t) -> str:
    return "skipped" if t is None else f"{t * 1e3:.2f}"


def _ratio(a, b) -> str:
    return "-" if a is None else f"{a / b:.1f}x"


def main(argv=None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--max-dense-mb", type=float, default=512.0, help="skip the dense route above this size (MB)")
    ap.add_argument("--max-loop-blocks", type=int, default=1 << 30,
                    help="skip the eager block loop for layers with more blocks than this")
    ap.add_argument("--backend", default=None,
                    help="backend of the block route (default: triton on CUDA, reference on CPU)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = []
    for name, (fi, fo, k) in layers(args.small).items():
        t0 = time.perf_counter()
        sym = pk.steerable(fi, fo, k)
        setup = time.perf_counter() - t0
        w = torch.randn(sym.weight_shape, device=device).requires_grad_()
        qt_bytes = sum(t.m * t.rank for t in sym.types) * 4
        dense_bytes = sym.numel * sym.dim * 4
        row = {"layer": name, "shape": "x".join(map(str, sym.weight_shape)), "N": sym.numel, "D": sym.dim,
               "setup_s": setup, "qt_bytes": qt_bytes, "dense_bytes": dense_bytes}
        backend = args.backend or ("triton" if device.type == "cuda" else "reference")
        row["backend"] = backend
        row["ours_s"] = C.time_call(_ours_fn(w, sym, backend), device)
        blocks = sum(t.n_blocks for t in sym.types)
        row["loop_s"] = (C.time_call(_loop_fn(w, sym), device, max_reps=5, min_reps=2)
                         if blocks <= args.max_loop_blocks else None)
        if dense_bytes <= args.max_dense_mb * 2 ** 20:
            q = sym.dense_basis().to(device=device, dtype=torch.float32)
            row["dense_s"] = C.time_call(_dense_fn(w, q), device, max_reps=10, min_reps=3)
            del q
        else:
            row["dense_s"] = None
        # the finite-group penalty (C4 group average, regular -> regular 5x5) of a weight of about
        # the same size: what the steerable route should cost within a small factor of
        c = max(4, 4 * round((sym.numel / 25) ** 0.5 / 4))
        wf = torch.randn(c, c, 5, 5, device=device).requires_grad_()
        row["finite_shape"] = f"{c}x{c}x5x5"
        row["finite_s"] = C.time_call(_finite_fn(wf), device)
        rows.append(row)
    info = C.device_info(device)
    print(f"Machine: {info['name']}, {info.get('cores', '?')} cores visible, {info['threads']} thread(s) used; "
          f"torch {info['torch']}; date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; commit {info['commit']}; "
          f"device {device}; block route: backend {rows[0]['backend'] if rows else '-'}")
    print()
    print("| layer | weight | N | D | Q dense (MB) | Q_t (KB) | memory ratio | ours fwd+bwd (ms) | dense Q (ms) | "
          "dense / ours | block loop (ms) | loop / ours | C4 group average, same size (ms) | ours / C4 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dense = "skipped" if r["dense_s"] is None else f"{r['dense_s'] * 1e3:.2f}"
        dratio = "-" if r["dense_s"] is None else f"{r['dense_s'] / r['ours_s']:.1f}x"
        print(f"| {r['layer']} | {r['shape']} | {r['N']} | {r['D']} | {r['dense_bytes'] / 2 ** 20:.1f} | "
              f"{r['qt_bytes'] / 2 ** 10:.1f} | {r['qt_bytes'] / r['dense_bytes']:.2e} | {r['ours_s'] * 1e3:.3f} | "
              f"{dense} | {dratio} | {_ms(r['loop_s'])} | {_ratio(r['loop_s'], r['ours_s'])} | "
              f"{r['finite_s'] * 1e3:.3f} ({r['finite_shape']}) | {r['ours_s'] / r['finite_s']:.1f}x |")
    return rows


if __name__ == "__main__":
    main()
