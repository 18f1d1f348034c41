import os

import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter, which must be switched on before
# triton is imported; the Triton routes of tests/test_conformance.py and tests/test_triton_backend.py
# then run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# PROJKERNELS_REQUIRE_TRITON=1 (set by CI): the Triton tests must run, so a missing or unusable Triton
# (not installed, the interpreter off on a machine without a GPU, a kernel that does not launch) fails
# the run instead of skipping those tests.  The Triton tests for the other device (the GPU ones on a
# CPU-only machine) still skip as every GPU test does.
REQUIRE_TRITON = os.environ.get("PROJKERNELS_REQUIRE_TRITON") == "1"


def triton_device() -> str:
    """The device the Triton tests run on here: the GPU when there is one, the interpreter otherwise."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _triton_problem():
    """None when backend='triton' computes a correct penalty on triton_device(), else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton cannot be imported: {e}"
    import projkernels as pk

    device = triton_device()
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not 1 on a machine without a GPU, so the Triton kernels cannot run"
    if "triton" not in pk.available_backends(device):
        try:
            pk.projected_penalty(torch.zeros(1, 1, device=device), "C1", backend="triton")
        except RuntimeError as e:
            return str(e)
        return f"backend='triton' is not available on {device}"
    w = torch.arange(16.0, dtype=torch.float64, device=device).reshape(4, 4)
    try:
        got = pk.projected_penalty(w, "C4", "regular", "regular", backend="triton")
    except Exception as e:  # noqa: BLE001 - any failure to launch is the problem being reported
        return f"a Triton kernel failed to run on {device}: {type(e).__name__}: {e}"
    expected = pk.projected_penalty(w, "C4", "regular", "regular", backend="reference")
    if not torch.allclose(got.cpu(), expected.cpu(), rtol=1e-12, atol=0):
        return f"backend='triton' gave {float(got)} for a penalty of {float(expected)}"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_sessionstart(session):
    if REQUIRE_TRITON:
        problem = _triton_problem()
        if problem is not None:
            raise pytest.UsageError(f"PROJKERNELS_REQUIRE_TRITON=1 but the Triton tests cannot run: {problem}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A Triton test that skips for any reason but the GPU marker's "no CUDA device" fails when
    # PROJKERNELS_REQUIRE_TRITON=1: a skip there means the kernels were not exercised.
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_TRITON and report.skipped and "triton" in item.nodeid.lower()):
        return
    if "gpu" in item.keywords and triton_device() == "cpu":
        return
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("device", triton_device()) != triton_device():
        return  # a route for the other device (the interpreter route on a GPU machine)
    report.outcome = "failed"
    report.longrepr = f"PROJKERNELS_REQUIRE_TRITON=1, but this Triton test skipped: {report.longrepr}"
