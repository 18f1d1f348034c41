"""The smoke-plume benchmark (projkernels.bench_smoke): conventions, the simulation's symmetry, the
models' equivariance, and one --tiny run end to end (splits, cache, equivariance, JSON)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from projkernels.bench_smoke import symmetry as sym
from projkernels.bench_smoke.models import build_model, relaxation_loss
from projkernels.bench_smoke.train import equivariance_error

if os.environ.get("PROJKERNELS_REQUIRE_PHIFLOW") == "1":
    import phi  # noqa: F401  CI sets this: the simulation tests must run, not skip
HAVE_PHI = True
try:
    import phi  # noqa: F401,F811
except ImportError:
    HAVE_PHI = False
needs_phi = pytest.mark.skipif(not HAVE_PHI, reason="PhiFlow is an optional dependency (pip install '.[smoke]')")


def _grad(f):
    """Central-difference gradient (component 0 along dim -2), periodic: commutes with rot90 exactly."""
    return torch.cat([torch.roll(f, -1, -2) - torch.roll(f, 1, -2), torch.roll(f, -1, -1) - torch.roll(f, 1, -1)], 1)


def test_missing_phiflow_error_names_an_install_command(monkeypatch):
    import sys
    from projkernels.bench_smoke import data

    monkeypatch.setitem(sys.modules, "phi", None)  # import phi raises ImportError, as without PhiFlow
    with pytest.raises(ImportError, match=r"simulates its data with PhiFlow") as info:
        data._import_phi()
    assert str(info.value).endswith('pip install --no-build-isolation -e ".[smoke]"')  # the tests run from a checkout


def test_rotate_velocity_is_the_action_on_gradients():
    # The gradient of a rotated scalar field is the rotated vector field: this pins (u, v) -> (-v, u)
    # to the same quarter turn as torch.rot90 on the plane (a sign or axis slip fails here).
    f = torch.randn(2, 1, 9, 9)
    for k in range(4):
        torch.testing.assert_close(_grad(torch.rot90(f, k, (-2, -1))), sym.rotate_velocity(_grad(f), k))
    assert (sym.rotate_velocity(_grad(f), 1) - _grad(f)).abs().max() > 0.1


def test_lift_is_equivariant_and_read_out_inverts_it():
    x = torch.randn(3, 6, 7, 7)
    torch.testing.assert_close(sym.read_out(sym.lift(x)), x)
    lifted = torch.rot90(sym.lift(x), 1, (-2, -1)).unflatten(1, (-1, 4))
    torch.testing.assert_close(sym.lift(sym.rotate_velocity(x, 1)), torch.roll(lifted, 1, 2).flatten(1, 2))


@pytest.mark.parametrize("method", ["none", "rpp", "relaxed"])
def test_initial_models_are_equivariant_and_relaxation_breaks_it(method):
    torch.manual_seed(0)
    model = build_model(2, 2, 3, "lifted", method, "cpu")
    x = torch.randn(4, 4, 12, 12)
    if method == "rpp":
        with torch.no_grad():
            for c in model.convs:
                c.free.weight.zero_()
    assert equivariance_error(model, x) < 1e-5
    with torch.no_grad():
        if method == "relaxed":
            assert float(relaxation_loss(model)) == 0.0
            model.convs[0].mix[0, 1] += 0.5
            assert float(relaxation_loss(model)) > 0.4
        elif method == "rpp":
            model.convs[1].free.weight.normal_()
        else:
            model.convs[1].weight.add_(torch.randn_like(model.convs[1].weight))
    assert equivariance_error(model, x) > 1e-2


def test_vector_declaration_is_equivariant():
    if not sym.vector_rep_available():
        pytest.skip(f"this projkernels has no usable {sym.VELOCITY!r} field type yet (the lifted declaration is used)")
    torch.manual_seed(0)
    model = build_model(2, 2, 3, "vector", "none", "cpu")
    assert model.convs[0].weight.shape[1] == 4   # 2 frames x 2 components
    assert equivariance_error(model, torch.randn(4, 4, 12, 12)) < 1e-5


def test_so2_route_attaches_escnn_spans_and_starts_rotation_equivariant():
    # The SO(2)-span route: velocity as frequency-1 fields, hidden scalars.  Projected onto that span the
    # network commutes with quarter turns on the grid (the span lies inside the C4-equivariant kernels, so
    # a convention slip between escnn's irrep(1) and rotate_velocity fails here), and its hidden 3x3
    # kernels are isotropic: equal on the four edge and the four corner pixels.
    if not sym.so2_available():
        pytest.skip("escnn is an optional dependency")
    import projkernels as pk
    from projkernels.model import model_penalty
    torch.manual_seed(0)
    model = build_model(2, 2, 3, "vector", "so2", "cpu")
    x = torch.randn(4, 4, 12, 12)
    assert equivariance_error(model, x) < 1e-5
    assert model_penalty(model).item() < 1e-8
    syms = [pk.get_symmetry(c).group for c in model.convs]
    assert all(isinstance(s, pk.SteerableSymmetry) for s in syms)
    w = model.convs[1].weight.detach()
    edges, corners = w[..., [0, 1, 1, 2], [1, 0, 2, 1]], w[..., [0, 0, 2, 2], [0, 2, 0, 2]]
    torch.testing.assert_close(edges, edges[..., :1].expand_as(edges), atol=1e-6, rtol=0)
    torch.testing.assert_close(corners, corners[..., :1].expand_as(corners), atol=1e-6, rtol=0)
    assert float(edges.abs().max()) > 1e-3        # not the zero kernel
    # a C4-equivariant hidden kernel that is not isotropic (a + shape, x shape differences) is penalised by
    # the SO(2) span but not by the group average
    with torch.no_grad():
        bump = torch.zeros_like(w)
        bump[..., [0, 1, 1, 2], [1, 0, 2, 1]] = 1.0
        bump[..., [0, 0, 2, 2], [0, 2, 0, 2]] = -1.0
        bump[..., 1, 1] = 0.0
        model.convs[1].weight.add_(bump)
    assert float(pk.projected_penalty(model.convs[1].weight, "C4", "trivial", "trivial")) < 1e-6
    assert model_penalty(model).item() > 1.0
    with pytest.raises(ValueError, match="group"):
        build_model(2, 2, 3, "lifted", "so2", "cpu")


@needs_phi
def test_simulation_is_c4_symmetric_exactly_when_breaking_is_zero():
    from projkernels.bench_smoke.data import SmokeConfig, simulate
    cfg = SmokeConfig(size=16, frames=3, warmup=2, split=2)
    # directions 0..3 with equal magnitudes, then the same with direction-dependent magnitudes
    v = torch.from_numpy(simulate([0, 1, 2, 3, 1], [0.1] * 5, [0.5, 0.5, 0.5, 0.5, 0.7], cfg))
    for k in range(1, 4):
        rel = (sym.rotate_velocity(v[0], k) - v[k]).norm() / v[k].norm()
        assert rel < 1e-4, (k, float(rel))
    assert (sym.rotate_velocity(v[0], 1) - v[4]).norm() / v[4].norm() > 1e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("phi", reason="PhiFlow is an optional dependency (pip install '.[smoke]')")
    from projkernels.bench_smoke.cli import main
    root = tmp_path_factory.mktemp("smoke")
    out, cache = str(root / "out"), str(root / "cache")
    summary = main(["--tiny", "--out", out, "--cache-dir", cache, "--no-progress"])
    with open(os.path.join(out, "summary.json")) as fh:
        saved = json.load(fh)
    return summary, saved, out, cache


def test_tiny_splits_are_disjoint_and_cached(tiny):
    from projkernels.bench_smoke.cli import data_config, parse_args
    from projkernels.bench_smoke.data import load_or_generate, make_splits
    summary, saved, out, cache = tiny
    sims = {k: set(v) for k, v in saved["data"]["simulations"].items()}
    assert not sims["train"] & sims["validation"] and not sims["train"] & sims["domain"]
    assert not sims["validation"] & sims["domain"]
    assert sims["future"] == sims["train"]   # the same simulations, later frames
    assert not saved["data"]["cache_hit"]
    args = parse_args(["--tiny", "--cache-dir", cache])
    cfg = data_config(args)
    again = load_or_generate(cfg, cache, log=lambda m: None)
    assert again["cache_hit"] and again["cache_path"] == saved["data"]["cache_path"]
    splits = make_splits(again, cfg, args.history)
    history, split = args.history, cfg.split
    # future samples read only frames >= split; training targets are all < split
    assert int(splits["train"]["frames"][:, 1].max()) < split
    assert int(splits["future"]["frames"][:, 1].min()) - history >= split
    # a different generation config is a different cache entry
    other = load_or_generate(data_config(parse_args(["--tiny", "--breaking", "0.25"])), None, log=lambda m: None)
    assert not other["cache_hit"] and not np.allclose(other["velocity"], again["velocity"])


def test_tiny_exact_model_is_equivariant_and_free_is_not(tiny):
    _, saved, _, _ = tiny
    rows = {r["method"]: r for r in saved["selected"]}
    assert rows["projected"]["equivariance_error"] < 1e-5
    assert rows["none"]["equivariance_error"] > 1e-3


def test_tiny_json_fields_present_and_finite(tiny):
    _, saved, out, _ = tiny
    assert saved["non_finite"] == []
    methods = {r["method"] for r in saved["selected"]}
    expected = {"none", "projected", "penalty", "decay", "rpp", "relaxed", "sample"}
    if sym.so2_available():
        expected.add("so2")
    else:
        assert "escnn" in saved["skipped_routes"]["so2"]
    assert methods == expected
    for r in saved["selected"] + saved["size_sweep"]:
        for key in ("future_rmse", "future_rmse_std", "domain_rmse", "domain_rmse_std", "validation_rmse",
                    "equivariance_error", "ms_per_step", "regulariser_share", "parameters"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r["label"], key)
        assert r["future_rmse"] > 0 and len(r["seeds"]) >= 3
    # each route's weight is the one with the lowest validation RMSE among its grid
    for r in saved["selected"]:
        grid = [q for q in saved["rows"] if q["method"] == r["method"]]
        assert r["validation_rmse"] == min(q["validation_rmse"] for q in grid)
    assert sorted({p["train_sims"] for p in saved["size_sweep"]}) == [1, 2, 4]
    if saved["figure"]:
        assert os.path.getsize(saved["figure"]) > 10_000
