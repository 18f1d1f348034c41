import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from projkernels import demo
from projkernels.model import model_penalty, project_
from projkernels.dispatch.multi import multi_penalty


def _tiny(tmp_path, *extra):
    return ["--steps", "40", "--train-size", "64", "--test-size", "32", "--size", "12", "--fields", "2",
            "--no-progress", "--out", str(tmp_path), *extra]


def test_quick_end_to_end(tmp_path, capsys):
    summary = demo.main(["--quick", *_tiny(tmp_path, "--lambdas", "1,100")])
    assert os.path.getsize(tmp_path / "demo.png") > 10_000
    with open(tmp_path / "summary.json") as fh:
        saved = json.load(fh)
    assert saved["runs"] == json.loads(json.dumps(summary["runs"]))
    methods = [r["method"] for r in saved["runs"]]
    assert methods == ["none", "penalty", "penalty", "decay", "decay", "projected", "sample"]
    decays = [r for r in saved["runs"] if r["method"] == "decay"]
    assert [r["weight"] for r in decays] == [1, 100]
    assert all(r["regulariser_ms_per_step"] > 0 for r in decays)  # the decay's own clock reached the table
    # --quick compares no other breaking strength
    assert [sw["breaking"] for sw in saved["breaking_sweep"]] == [0.3]
    for r in saved["runs"]:
        assert 0 < r["test_error"] < 1.5 and 0 < r["train_error"] < 1.5 and r["ms_per_step"] > 0
        assert 0 <= r["regulariser_share"] < 1
        assert [l["name"] for l in r["layers"]] == ["lift", "blocks.0", "blocks.1", "head"]
    by = {r["label"]: r for r in saved["runs"]}
    assert by["projected (exact)"]["equivariance_error"] < 1e-5
    assert by["no penalty"]["equivariance_error"] > 1e-2
    assert 0 < saved["task"]["equivariant_floor_test_error"] < 1
    out = capsys.readouterr().out
    assert "penalty lambda=100" in out and "reg share" in out and "rel. non-eq" in out
    assert "train err" in out and "lowest test error:" in out


def test_compare_breaking_reruns_on_a_symmetric_target(tmp_path, capsys):
    summary = demo.main(_tiny(tmp_path, "--steps", "20", "--lambdas", "10", "--compare-breaking", "0"))
    sweeps = summary["breaking_sweep"]
    assert [sw["breaking"] for sw in sweeps] == [0.3, 0.0]
    assert [r["method"] for r in sweeps[0]["runs"]] == ["none", "penalty", "decay", "projected", "sample"]
    assert [r["method"] for r in sweeps[1]["runs"]] == ["none", "penalty", "decay", "projected"]
    # with breaking=0 the target is exactly equivariant, so nothing is lost by exact equivariance
    assert sweeps[1]["target_equivariance_error"] < 1e-5
    assert sweeps[1]["equivariant_floor_test_error"] < 1e-6
    assert 0.01 < sweeps[0]["equivariant_floor_test_error"] < 0.2
    assert summary["runs"] == sweeps[0]["runs"]
    assert os.path.getsize(tmp_path / "demo.png") > 10_000
    out = capsys.readouterr().out
    assert "breaking=0.3 (" in out and "breaking=0 (" in out


def test_large_lambda_gives_far_smaller_equivariance_error(tmp_path):
    summary = demo.main(_tiny(tmp_path, "--steps", "60", "--lambdas", "1000", "--no-baselines",
                              "--compare-breaking", ""))
    none, big, _ = summary["runs"]  # no penalty, penalty, decay
    assert big["weight"] == 1000
    assert big["equivariance_error"] < 0.1 * none["equivariance_error"]
    assert big["test_error"] < 1.0  # it still learned something


def test_projected_gradients_keep_adam_steps_equivariant():
    torch.manual_seed(0)
    model = demo.build_model(fields=2, depth=1, device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 1, 10, 10)
    y = demo.breaking_part(x)  # a target that pulls the weights away from equivariance
    norm2 = sum(float(p.detach().square().sum()) for p in model.parameters())
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        demo.project_grads_(model)
        opt.step()
    # no weight projection after the steps: the update itself stayed in the equivariant subspace
    assert float(model_penalty(model).detach()) < 1e-10 * norm2
    # whereas the raw gradient of this target is far from equivariant
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    demo.project_grads_(model)
    moved = sum(float((g - p.grad).square().sum()) for g, p in zip(grads, model.parameters()))
    assert moved > 1e-3 * sum(float(g.square().sum()) for g in grads)


def test_verdict_names_the_best_run():
    runs = [{"method": "none", "label": "no penalty", "test_error": 0.05},
            {"method": "penalty", "label": "penalty lambda=1", "test_error": 0.03},
            {"method": "penalty", "label": "penalty lambda=100", "test_error": 0.09},
            {"method": "projected", "label": "projected (exact)", "test_error": 0.07}]
    line = demo.verdict(runs)
    assert line.startswith("lowest test error: penalty lambda=1 (0.0300)")
    assert "beats both" in line
    runs[3]["test_error"] = 0.02
    assert "does not beat" in demo.verdict(runs)


def test_bad_flags_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        demo.parse_args(["--lambdas", "1,x"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--lambdas", "0"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--compare-breaking", "0,y"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--train-size", "0"])


def test_defaults_are_the_data_limited_setup():
    args = demo.parse_args([])
    assert args.train_size < args.test_size and args.train_size <= 256
    assert args.breaking_list == [0.3, 0.0]
    quick = demo.parse_args(["--quick"])
    assert quick.breaking_list == [0.3] and quick.steps < args.steps


def test_results_survive_a_missing_matplotlib(tmp_path, capsys, monkeypatch):
    # None in sys.modules makes `import matplotlib` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    summary = demo.main(_tiny(tmp_path, "--steps", "8", "--lambdas", "1", "--no-baselines", "--compare-breaking", ""))
    captured = capsys.readouterr()
    assert "note: no figure: matplotlib is not importable" in captured.err and "pip install" in captured.err
    assert "penalty lambda=1" in captured.out and "lowest test error:" in captured.out
    assert not (tmp_path / "demo.png").exists()
    with open(tmp_path / "summary.json") as fh:
        saved = json.load(fh)
    assert saved["figure"] is None and summary["figure"] is None
    assert [r["method"] for r in saved["runs"]] == ["none", "penalty", "decay"]


def test_a_failing_plot_does_not_lose_results(tmp_path, capsys, monkeypatch):
    from projkernels.demo import plot

    def broken(*args, **kwargs):
        raise RuntimeError("no display")
    monkeypatch.setattr(plot, "make_figure", broken)
    demo.main(_tiny(tmp_path, "--steps", "8", "--lambdas", "1", "--no-baselines", "--compare-breaking", ""))
    captured = capsys.readouterr()
    assert "RuntimeError: no display" in captured.err and "lowest test error:" in captured.out
    with open(tmp_path / "summary.json") as fh:
        assert len(json.load(fh)["runs"]) == 3


def test_module_entry_point_runs():
    # `python -m projkernels.demo` is the README's main job; --help exercises the package's __main__.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "projkernels.demo", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--breaking" in out.stdout


@pytest.mark.parametrize("out_channels", [None, 2])
def test_gcnn_projected_is_exactly_equivariant_and_the_sample_loss_vanishes(out_channels):
    torch.manual_seed(0)
    model = demo.GCNN((2, 2), in_channels=3, out_channels=out_channels).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert demo.sample_equivariance_loss(model, x) > 1e-6  # random weights are not equivariant
    project_(model.attach())
    y = model(x)
    for j in range(1, 4):  # every rotation, with the output's own action (regular: shifted components)
        assert (model(model.rotate_input(x, j)) - model.rotate_output(y, j)).abs().max() < 1e-12
    g = torch.Generator().manual_seed(1)
    assert demo.sample_equivariance_loss(model, x, generator=g) < 1e-20
    total, *_ = multi_penalty(model.penalty_items())
    assert total < 1e-20


def test_gcnn_layout():
    model = demo.GCNN((2, 3), in_channels=3, out_channels=None, bias=False)
    assert [tuple(w.shape) for w, *_ in model.penalty_items()] == [(8, 3, 3, 3), (12, 8, 3, 3)]
    assert model.reps() == [("trivial", "regular"), ("regular", "regular")]
    headed = demo.GCNN((2,), out_channels=5, lift_kernel=5)
    assert headed.reps() == [("trivial", "regular"), ("regular", "trivial")]
    assert tuple(headed.lift.weight.shape) == (8, 1, 5, 5) and tuple(headed.head.weight.shape) == (5, 8, 3, 3)
    with pytest.raises(ValueError, match="group: GCNN rotates by multiples of 90 degrees"):
        demo.GCNN((2,), group="D4")
    with pytest.raises(ValueError, match="group:"):
        demo.GCNN((2,), group="C8")
