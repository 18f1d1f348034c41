"""torch.compile in a fresh process: the first call of a projkernels op is a compiled one.

The in-process compile tests (tests/test_api.py, test_cpp_backend.py, test_cuda_backend.py,
test_triton_backend.py) run after other tests have called the ops eagerly, which hides failures
that only a cold start shows (tables, op registrations or fake kernels that an eager call sets up).
Each case here starts a new interpreter, compiles a training step with fullgraph=True, runs it
forward and backward before any eager call, and only then compares with eager.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import projkernels as pk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import projkernels as pk

    fn, backend, device = sys.argv[1:4]
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8, device=device)
    w0 = torch.randn(8, 8, 3, 3, device=device) * 0.3
    kw = dict(group="C4", in_rep="regular", out_rep="regular", backend=backend)

    def loss_fn(w):
        y = torch.nn.functional.conv2d(x, w, padding=1)
        if fn == "projected_penalty":
            reg = 0.1 * pk.projected_penalty(w, **kw)
        elif fn == "penalty_and_energy":
            penalty, energy = pk.penalty_and_energy(w, **kw)
            reg = 0.1 * penalty + 1e-2 * energy
        elif fn == "project":
            reg = (w - pk.project(w, **kw)).square().sum()
        else:
            raise SystemExit(f"unknown function {fn}")
        return y.square().mean() + reg

    compiled = torch.compile(loss_fn, fullgraph=True)
    w = w0.clone().requires_grad_(True)
    loss = compiled(w)          # the first call of the op in this process
    loss.backward()
    w_eager = w0.clone().requires_grad_(True)
    loss_eager = loss_fn(w_eager)
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_eager.grad, rtol=1e-5, atol=1e-6)
    assert float(w.grad.abs().sum()) > 0
    print("RESULT " + json.dumps({"loss": float(loss), "eager": float(loss_eager)}))
""")

CASES = [
    pytest.param("projected_penalty", "reference", "cpu", id="projected_penalty-reference-cpu"),
    pytest.param("projected_penalty", "cpp", "cpu", id="projected_penalty-cpp-cpu"),
    pytest.param("penalty_and_energy", "cpp", "cpu", id="penalty_and_energy-cpp-cpu"),
    pytest.param("project", "cpp", "cpu", id="project-cpp-cpu"),
    pytest.param("projected_penalty", "cuda", "cuda", marks=pytest.mark.gpu, id="projected_penalty-cuda-cuda"),
    pytest.param("penalty_and_energy", "triton", "cuda", marks=pytest.mark.gpu, id="penalty_and_energy-triton-cuda"),
]


@pytest.mark.parametrize("fn,backend,device", CASES)
def test_compiled_first_call_in_a_fresh_process(fn, backend, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend not in pk.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available on {device}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, fn, backend, device], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"fresh-process compile of {fn} (backend={backend}) failed:\n{tail}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, f"no result printed:\n{tail}"
    result = json.loads(line[-1][len("RESULT "):])
    assert result["loss"] > 0 and abs(result["loss"] - result["eager"]) <= 1e-5 * abs(result["eager"]) + 1e-6
