"""Benchmark table: our backends against the baselines, printed, saved as JSON, plotted.

    python bench/run.py                       # default (CPU: a few minutes)
    python bench/run.py --large               # adds the >= 64 MB weight sets
    python bench/run.py --out bench/results.json --plot bench/plot.png --markdown bench/RESULTS.md
    python bench/run.py --host                # host cost vs native ops only (CPU, 1 thread; bench/host.py)
    python bench/run.py --decay               # one decay step vs model_penalty and _foreach_mul_ (bench/decay_bench.py)
    python bench/run.py --conv3d --markdown bench/RESULTS.md   # only the Conv3d rows (cube groups)

Forward = penalty (ours: penalty and energy from one pass); forward+backward = the penalty and its
gradient.  Effective bytes: one read of W forward; read W, read W again, write dW for both.  The
copy bandwidth is that of a large tensor copy (read + write) in the same run.  CPU times are the
best of >= 5 repeats, and of --passes separate measurements.  --markdown rewrites
only the block between the results markers of the given file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402

import common as C  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CONV3D_BEGIN, CONV3D_END = "<!-- conv3d:begin -->", "<!-- conv3d:end -->"


def _ms(t):
    return "-" if t is None else f"{t * 1e3:.3f}"


def _x(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.1f}x"


def table(rows, header):
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 or i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(rows, header):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def measure(f, make_input, device, min_time):
    try:
        return C.fwd_and_fwdbwd(f, make_input, device, min_time=min_time) + (None,)
    except Exception as e:  # a baseline that cannot run at this size is reported, not fatal
        traceback.print_exc()
        return None, None, f"{type(e).__name__}: {e}"[:200]


def measure_passes(f, make_input, device, min_time, passes):
    """Best of ``passes`` separate measurements: a burst of load from other processes during one
    measurement (two OpenMP threads on two cores stall badly when one is descheduled) is not kept."""
    best = [None, None, None]
    for _ in range(passes):
        fwd, both, err = measure(f, make_input, device, min_time)
        if err:
            return None, None, err
        best = [fwd if best[0] is None else min(best[0], fwd), both if best[1] is None else min(best[1], both), None]
    return tuple(best)


def run_layers(cases, device, copy_bw, min_time, log, passes=2):
    results = []
    for case in cases:
        with_loop = case in (C.TARGET_CASE, C.TARGET_CASE_21MB)
        methods = C.layer_methods(case, device, with_compiled_loop=with_loop)
        for name, f in methods.items():
            t0 = time.time()
            fwd, both, err = measure_passes(f, lambda: case.weight(device), device, min_time, passes)
            r = {"case": case.name, "note": case.note, "shape": list(case.shape), "group": case.group,
                 "in_rep": case.in_rep, "out_rep": case.out_rep, "dtype": case.dtype_name,
                 "bytes": case.nbytes, "method": name, "fwd_s": fwd, "fwdbwd_s": both, "error": err}
            if fwd:
                r["fwd_GBps"] = case.nbytes / fwd / 1e9
                r["fwd_frac_copy"] = case.nbytes / fwd / copy_bw
            if both:
                r["fwdbwd_GBps"] = 3 * case.nbytes / both / 1e9
                r["fwdbwd_frac_copy"] = 3 * case.nbytes / both / copy_bw
            results.append(r)
            log(f"  {case.name:34s} {name:18s} fwd {_ms(fwd):>10s} ms  fwd+bwd {_ms(both):>10s} ms"
                f"  ({time.time() - t0:.1f} s)")
    return results


def run_model(specs, device, min_time, log, passes=2):
    results = []
    methods = C.model_methods(specs, device)
    n = sum(C.Case(s[0], *s[1:], torch.float32).numel for s in specs)
    for name, f in methods.items():
        fwd, both, err = measure_passes(f, lambda: C.model_weights(specs, device), device, min_time, passes)
        results.append({"method": name, "layers": len(specs), "numel": n, "fwd_s": fwd, "fwdbwd_s": both,
                        "error": err})
        log(f"  model {name:22s} fwd {_ms(fwd):>10s} ms  fwd+bwd {_ms(both):>10s} ms")
    return results


def run_training(device, min_time, log, passes=2):
    steps = {reg: C.training_step(reg, device) for reg in ("none", "projection", "sample")}
    out = {}
    for _ in range(passes):  # interleaved, so that a burst of outside load does not hit one variant only
        for reg, step in steps.items():
            t = C.time_call(step, device, min_time=max(min_time, 1.0), max_reps=30, min_reps=5)
            out[reg] = min(out.get(reg, t), t)
    for reg, t in out.items():
        log(f"  training step, regulariser={reg:10s} {_ms(t)} ms")
    return out


def layer_rows(results, copy_bw):
    by_case = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["method"]] = r
    rows = []
    for case, methods in by_case.items():
        eager = methods.get("eager loop", {})
        for name, r in methods.items():
            ours = name.startswith("ours:")
            rows.append([case, name, _ms(r["fwd_s"]), _ms(r["fwdbwd_s"]),
                         _x(eager.get("fwd_s"), r["fwd_s"]), _x(eager.get("fwdbwd_s"), r["fwdbwd_s"]),
                         f"{100 * r['fwd_frac_copy']:.0f}%" if ours and r.get("fwd_frac_copy") else "-",
                         f"{100 * r['fwdbwd_frac_copy']:.0f}%" if ours and r.get("fwdbwd_frac_copy") else "-"])
    header = ["case", "method", "fwd ms", "fwd+bwd ms", "eager/this fwd", "eager/this f+b",
              "fwd %copy", "f+b %copy"]
    return rows, header


def model_rows(results):
    ref = {r["method"]: r for r in results}
    eager, comp = ref.get("eager loop", {}), ref.get("compile(gather)", {})
    rows = [[r["method"], "", _ms(r["fwd_s"]), _ms(r["fwdbwd_s"]), _x(eager.get("fwdbwd_s"), r["fwdbwd_s"]),
             _x(comp.get("fwdbwd_s"), r["fwdbwd_s"])] for r in results]
    return rows, ["method", "", "fwd ms", "fwd+bwd ms", "eager/this f+b", "compile/this f+b"]


def targets(data):
    """One line per target of the project, with the figure measured here or why it was not."""
    gpu = data["info"]["device"].startswith("cuda")
    lines = []
    layers = {}
    for r in data["layers"]:
        layers.setdefault(r["case"], {})[r["method"]] = r
    ours = [n for n in {r["method"] for r in data["layers"]} if n.startswith("ours:")]
    compiled = [n for n in ours if n != "ours:reference"]

    for case in (C.TARGET_CASE, C.TARGET_CASE_21MB):
        m = layers.get(case.name, {})
        eager = m.get("eager loop", {}).get("fwdbwd_s")
        parts = [f"{n[5:]} {eager / m[n]['fwdbwd_s']:.1f}x" for n in sorted(ours)
                 if eager and m.get(n, {}).get("fwdbwd_s")]
        comp = m.get("compile(gather)", {}).get("fwdbwd_s")
        if eager and comp:
            parts.append(f"(compile(gather) {eager / comp:.1f}x)")
        status = ("cpp backend not available: only the reference measured" if not any(
            n == "ours:cpp" for n in compiled) else
                  ("met" if eager and m.get("ours:cpp", {}).get("fwdbwd_s") and
                   eager / m["ours:cpp"]["fwdbwd_s"] >= 20 else "not met"))
        lines.append(f"CPU target, {case.name} ({case.nbytes / 2**20:.1f} MiB) fwd+bwd vs eager loop (>= 20x): "
                     + ", ".join(parts) + f" -> {status}")

    if gpu:
        for n in compiled:
            big = [r for r in data["layers"] if r["method"] == n and r["bytes"] >= 64 * 2 ** 20 and r.get("fwd_s")]
            if big:
                f = min(r["fwd_frac_copy"] for r in big)
                b = min(r["fwdbwd_frac_copy"] for r in big)
                lines.append(f"GPU bandwidth, {n[5:]} at >= 64 MB: fwd >= {100 * f:.0f}% (target 80%), "
                             f"fwd+bwd >= {100 * b:.0f}% (target 70%) of copy bandwidth")
            else:
                lines.append(f"GPU bandwidth, {n[5:]}: no >= 64 MB case run (use --large)")
    else:
        lines.append("GPU bandwidth targets (fwd >= 80%, fwd+bwd >= 70% of copy at >= 64 MB): not measured: no GPU")

    model = {r["method"]: r for r in data["model"]}
    best = min((r for n, r in model.items() if n.startswith("multi:") and r.get("fwdbwd_s")),
               key=lambda r: r["fwdbwd_s"], default=None)
    if best:
        comp, eager = model.get("compile(gather)", {}).get("fwdbwd_s"), model.get("eager loop", {}).get("fwdbwd_s")
        where = "" if gpu else " [GPU target; measured here on CPU]"
        lines.append(f"Whole model ({best['layers']} layers), {best['method']} fwd+bwd: "
                     f"{_x(comp, best['fwdbwd_s'])} torch.compile(gather) (target >= 3x), "
                     f"{_x(eager, best['fwdbwd_s'])} eager loop (target >= 10x){where}")

    tr = data.get("training")
    if tr:
        base = tr["none"]
        lines.append(f"Training step (C4 G-CNN, base {base * 1e3:.1f} ms): projection penalty adds "
                     f"{100 * (tr['projection'] - base) / base:.1f}% (target <= 3%), sample-based adds "
                     f"{100 * (tr['sample'] - base) / base:.1f}% (target >= 50% for the baseline)"
                     + ("" if gpu else " [GPU target; measured here on CPU]"))

    dense = [(case, m) for case, m in layers.items() if "dense basis" in m and m["dense basis"].get("fwdbwd_s")]
    for case, m in dense:
        d = m["dense basis"]
        parts = [f"{n[5:]} fwd {d['fwd_s'] / m[n]['fwd_s']:.0f}x, fwd+bwd {d['fwdbwd_s'] / m[n]['fwdbwd_s']:.0f}x"
                 for n in sorted(ours) if m.get(n, {}).get("fwdbwd_s")]
        lines.append(f"Dense basis / ours at {case} (target >= 100x): " + "; ".join(parts))
    return lines


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = [r for r in data["layers"] if r["group"] == "C4" and r["in_rep"] == r["out_rep"] == "regular"
              and r["dtype"] == "float32"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "fwd_s", "forward"), (axes[1], "fwdbwd_s", "forward + backward")):
        for method in sorted({r["method"] for r in series}):
            pts = sorted((r["bytes"] / 2 ** 20, r[key] * 1e3) for r in series if r["method"] == method and r[key])
            if pts:
                style = "-o" if method.startswith("ours:") else "--s"
                ax.plot(*zip(*pts), style, label=method, markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("weight size (MiB, float32)")
        ax.set_title(f"C4 regular 3x3, {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time per call (ms)")
    axes[1].legend(fontsize=8)
    info = data["info"]
    fig.suptitle(f"{info['name']} ({info['device']}), commit {info['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_block(data):
    info = data["info"]
    copy = data["copy_GBps"]
    rows, header = layer_rows(data["layers"], copy * 1e9)
    mrows, mheader = model_rows(data["model"])
    tr = data.get("training", {})
    parts = [
        f"Device: {info['name']} ({info['device']}, {info.get('cores', '?')} cores, "
        f"{info['threads']} torch threads), torch {info['torch']}; date {data['date']}; commit {info['commit']}; "
        f"command `{data['command']}`.",
        "",
        f"Copy bandwidth (large tensor copy, read + write): {copy:.1f} GB/s.",
        "",
        "### Targets",
        "",
        *[f"- {line}" for line in targets(data)],
        "",
        "### Single layer",
        "",
        md_table(rows, header),
        "",
        f"### Whole model ({data['model'][0]['layers']} layers, {data['model'][0]['numel'] / 1e6:.2f} M weights, "
        "float32)" if data["model"] else "### Whole model",
        "",
        md_table(mrows, mheader),
        "",
    ]
    if tr:
        base = tr["none"]
        parts += ["### Training step (C4 G-CNN, plain Conv2d, "
                  f"fields {C.TRAIN_FIELDS}, batch {C.TRAIN_BATCH}, {C.TRAIN_SIZE}x{C.TRAIN_SIZE})", "",
                  md_table([[k, "", _ms(v), f"{100 * (v - base) / base:+.1f}%"] for k, v in tr.items()],
                           ["regulariser", "", "step ms", "added vs none"]), ""]
    parts += ["![time vs weight size](plot.png)", ""]
    return "\n".join(parts)


def write_markdown(path, block, begin=BEGIN, end=END):
    text = open(path).read() if os.path.exists(path) else f"# Benchmark results\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as fh:
        fh.write(head + begin + "\n" + block + "\n" + end + tail)


def conv3d_block(data):
    """The Conv3d rows (cube groups) as markdown, with the machine, date and commit they were run on."""
    info = data["info"]
    rows, header = layer_rows(data["layers"], data["copy_GBps"] * 1e9)
    by = {(r["case"], r["method"]): r for r in data["layers"]}
    lines = []
    for case in dict.fromkeys(r["case"] for r in data["layers"]):
        eager, comp = by.get((case, "eager loop"), {}), by.get((case, "compile(gather)"), {})
        best = min((r for (c, m), r in by.items() if c == case and m.startswith("ours:") and r.get("fwdbwd_s")),
                   key=lambda r: r["fwdbwd_s"], default=None)
        if best and eager.get("fwdbwd_s") and comp.get("fwdbwd_s"):
            lines.append(f"- {case}: {best['method']} fwd+bwd {_ms(best['fwdbwd_s'])} ms, "
                         f"{eager['fwdbwd_s'] / best['fwdbwd_s']:.1f}x faster than the eager group loop, "
                         f"{comp['fwdbwd_s'] / best['fwdbwd_s']:.1f}x faster than torch.compile(gather)")
    return "\n".join([
        f"Device: {info['name']} ({info['device']}, {info.get('cores', '?')} cores, {info['threads']} torch threads), "
        f"torch {info['torch']}; date {data['date']}; commit {info['commit']}; command `{data['command']}`.",
        "", *lines, "", md_table(rows, header), ""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--large", action="store_true", help="add the >= 64 MB weight sets")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--plot", default=os.path.join(HERE, "plot.png"))
    ap.add_argument("--markdown", default=None, help="update the results block of this markdown file")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of repeats per measurement")
    ap.add_argument("--passes", type=int, default=2, help="separate measurements per entry; the best is kept")
    ap.add_argument("--quick", action="store_true", help="a few cases only (smoke run)")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--conv3d", action="store_true",
                    help="only the Conv3d rows (the cube groups O / Oh on 3-D kernels); --markdown updates their section")
    ap.add_argument("--host", action="store_true",
                    help="only the host-cost table: the API on tiny weights vs native ops, CPU, 1 thread")
    ap.add_argument("--decay", action="store_true",
                    help="only the equivariance-decay table: one decay step against model_penalty forward+backward "
                         "and torch._foreach_mul_ over the same weights")
    args = ap.parse_args(argv)
    if args.host:
        import host
        host.main([])
        return
    if args.decay:
        import decay_bench
        decay_bench.main(["--device", args.device or "cpu"])
        return
    large = args.large or C.large_requested()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = lambda s: print(s, flush=True)

    info = C.device_info(device)
    log(f"device: {info['name']} ({device}), torch {info['torch']}, threads {info['threads']}, "
        f"commit {info['commit']}; our backends: {C.our_backends(device)}")
    copy_bw = C.copy_bandwidth(device)
    log(f"copy bandwidth: {copy_bw / 1e9:.2f} GB/s")
    cases = C.selected_cases(large)
    if args.quick:
        cases = [c for c in cases if c.numel <= 2e5] + [C.TARGET_CASE]
    data = {"info": info, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "copy_GBps": copy_bw / 1e9, "large": large}
    if args.conv3d:
        log("Conv3d layers:")
        data["layers"] = run_layers(C.CONV3D_CASES, device, copy_bw, args.min_time, log, args.passes)
        rows, header = layer_rows(data["layers"], copy_bw)
        print()
        print(table(rows, header))
        if args.markdown:
            write_markdown(args.markdown, conv3d_block(data), CONV3D_BEGIN, CONV3D_END)
            log(f"updated {args.markdown}")
        return
    log("single layer:")
    data["layers"] = run_layers(cases, device, copy_bw, args.min_time, log, args.passes)
    log("whole model:")
    data["model"] = run_model(C.model_specs(large), device, args.min_time, log, args.passes)
    if not args.skip_training:
        log("training step:")
        data["training"] = run_training(device, args.min_time, log, args.passes)

    rows, header = layer_rows(data["layers"], copy_bw)
    print()
    print(table(rows, header))
    print()
    mrows, mheader = model_rows(data["model"])
    print(table(mrows, mheader))
    print()
    for line in targets(data):
        print(line)

    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=1)
    log(f"wrote {args.out}")
    if args.plot:
        plot(data, args.plot)
        log(f"wrote {args.plot}")
    if args.markdown:
        write_markdown(args.markdown, markdown_block(data))
        log(f"updated {args.markdown}")


if __name__ == "__main__":
    main()
