import json
import os

import pytest

from projkernels import demo


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
    assert methods == ["none", "penalty", "penalty", "projected", "sample"]
    for r in saved["runs"]:
        assert 0 < r["test_error"] < 1.5 and r["ms_per_step"] > 0
        assert 0 <= r["regulariser_share"] < 1
        assert [l["name"] for l in r["layers"]] == ["lift", "blocks.0", "blocks.1", "head"]
    by = {r["label"]: r for r in saved["runs"]}
    assert by["projected (exact)"]["equivariance_error"] < 1e-5
    assert by["no penalty"]["equivariance_error"] > 1e-2
    assert 0 < saved["task"]["equivariant_floor_test_error"] < 1
    out = capsys.readouterr().out
    assert "penalty lambda=100" in out and "reg share" in out and "rel. non-eq" in out


def test_large_lambda_gives_far_smaller_equivariance_error(tmp_path):
    summary = demo.main(_tiny(tmp_path, "--steps", "60", "--lambdas", "1000", "--no-baselines"))
    none, big = summary["runs"]
    assert big["weight"] == 1000
    assert big["equivariance_error"] < 0.1 * none["equivariance_error"]
    assert big["test_error"] < 1.0  # it still learned something


def test_bad_flags_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        demo.parse_args(["--lambdas", "1,x"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--lambdas", "0"])
