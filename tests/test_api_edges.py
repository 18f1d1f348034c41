"""Mistakes a user makes at the API's edges get a clear error (or warning) where they are made:
naming the argument, saying what was expected and what to do, and short whatever was passed."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import projkernels as pk


def _model():
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    pk.attach_symmetry(m[0], "C4", "regular", "regular")
    pk.attach_symmetry(m[1], "C4", "regular", "regular")
    return m


def test_project_with_nothing_attached_raises():
    # Silently doing nothing would leave a user believing the model is now exactly equivariant.
    model = nn.Sequential(nn.Conv2d(4, 4, 3))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"model: no layer has a symmetry attached.*attach_symmetr"):
        pk.project_(model)
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("arg", ["lambda_perp", "lambda_G"])
@pytest.mark.parametrize("value", [-1.0, -1, float("nan"), math.inf, -math.inf])
def test_model_penalty_refuses_bad_lambdas_like_the_decay(arg, value):
    model = _model()
    with pytest.raises(ValueError, match=rf"{arg}: expected a finite non-negative number"):
        pk.model_penalty(model, **{arg: value})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"lambda_perp": 0.1, **{arg: value}}
    with pytest.raises(ValueError, match=rf"{arg}: expected a finite non-negative number"):
        pk.equivariance_decay(opt, model, **kwargs)


def test_model_penalty_lambda_types():
    model = _model()
    with pytest.raises(TypeError, match="lambda_perp: expected a non-negative number, got str"):
        pk.model_penalty(model, lambda_perp="1")
    # ints, 0-dim tensors and plain floats are still accepted, with the same value
    ref = pk.model_penalty(model, 0.5, 0.25)
    assert torch.equal(pk.model_penalty(model, torch.tensor(0.5), 0.25), ref)
    assert torch.equal(pk.model_penalty(model, 1, 0), pk.model_penalty(model, 1.0, 0.0))


def test_attach_symmetries_refuses_a_two_entry_rule_tuple():
    # ("C4", "regular") used to become regular -> trivial without a word.
    model = nn.Sequential(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"layer '0'.*rule: a tuple must be \(group, in_rep, out_rep\).*got 2"):
        pk.attach_symmetries(model, lambda name, m: ("C4", "regular"))
    assert pk.get_symmetry(model[0]) is None
    with pytest.raises(ValueError, match=r"rule: a dict must have the key 'group'.*'in_rep'"):
        pk.attach_symmetries(model, lambda name, m: {"grp": "C4"})
    # the full forms still work
    got = pk.attach_symmetries(model, lambda name, m: ("C4", "regular", "regular"))
    assert got["0"] == pk.Symmetry("C4", "regular", "regular")


def test_attach_refuses_a_bad_backend_at_attach_time():
    layer = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match=r"backend: unknown backend 'bogus'"):
        pk.attach_symmetry(layer, "C4", "regular", "regular", backend="bogus")
    model = nn.Sequential(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"layer '0'.*backend: unknown backend 'cudda'"):
        pk.attach_symmetries(model, lambda n, m: ("C4", "regular", "regular", "cudda"))


def test_two_decays_on_one_optimizer_refused_until_the_first_is_removed():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = pk.equivariance_decay(opt, model, 0.1)
    with pytest.raises(ValueError, match=r"optimizer: already has an equivariance decay .*remove\(\) on the first "
                                         r"handle, or give each decay its own layers"):
        pk.equivariance_decay(opt, model, 0.1)
    first.remove()
    second = pk.equivariance_decay(opt, model, 0.1)
    assert second.attached
    # one decay acts once: a decoupled step with a zero gradient moves W by exactly -2 lr lambda (W - PW)
    w0 = model[0].weight.detach().clone()
    pw0 = pk.project(w0, "C4", "regular", "regular")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w0 - 2 * 0.1 * 0.1 * (w0 - pw0), rtol=1e-6, atol=1e-7)


def test_decay_on_a_parametrized_layer_names_the_parametrization():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    layer = nn.Linear(8, 8)
    pk.attach_symmetry(layer, "C4", "regular", "regular")
    parametrize.register_parametrization(layer, "weight", Double())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"weight is parametrized.*model_penalty"):
        pk.equivariance_decay(opt, layer, 0.1)
    # the penalty itself works through the parametrization
    assert pk.model_penalty(layer).requires_grad


@pytest.mark.parametrize("fn", [pk.model_penalty, pk.project_, pk.equivariance_report])
def test_a_list_is_not_a_model(fn):
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module, got list.*ModuleList"):
        fn([_model()])


@pytest.mark.parametrize("fn", [pk.model_penalty, pk.project_, pk.equivariance_report])
def test_a_replaced_parameter_is_named_by_its_layer(fn):
    model = _model()
    pk.model_penalty(model)  # a plan is cached first
    model[1].weight = nn.Parameter(torch.randn(8, 6, 3, 3))
    with pytest.raises(ValueError, match=r"^layer '1' \(Conv2d 8x6x3x3\): weight: dim 1"):
        fn(model)


def test_huge_group_names_give_short_value_errors():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"group: .*order.*largest order allowed is 512") as info:
        pk.projected_penalty(w, "C" + "9" * 400)
    assert len(str(info.value)) < 600
    for name in ("C" * 1_000_000, "x" * 1_000_000):
        with pytest.raises(ValueError, match="unknown group") as info:
            pk.projected_penalty(w, name)
        assert len(str(info.value)) < 1500 and "(1000002 characters)" in str(info.value)  # repr adds quotes
    with pytest.raises(ValueError, match="in_rep: unknown representation") as info:
        pk.projected_penalty(w, "C4", "r" * 100_000)
    assert len(str(info.value)) < 600
    with pytest.raises(ValueError, match="backend: unknown backend") as info:
        pk.projected_penalty(w, "C4", backend="b" * 100_000)
    assert len(str(info.value)) < 600


@pytest.mark.parametrize("backend", ["reference", "cpp", "auto"])
def test_float8_and_sparse_weights_are_refused_by_every_backend(backend):
    if backend not in pk.available_backends("cpu") + ["auto"]:
        pytest.skip(f"{backend} not available")
    w = torch.randn(8, 8)
    for bad in (w.to(torch.float8_e4m3fn), w.to(torch.float8_e5m2)):
        with pytest.raises(TypeError, match=r"weight: expected a floating dtype \(float16, bfloat16, float32 or float64\)"):
            pk.projected_penalty(bad, "C4", "regular", "regular", backend=backend)
        with pytest.raises(TypeError, match=r"items\[0\]: weight: expected a floating dtype"):
            pk.multi_penalty([(bad, "C4", "regular", "regular")], backend=backend)
    for sparse in (w.to_sparse(), w.to_sparse_csr()):
        with pytest.raises(TypeError, match=r"weight: expected a dense \(strided\) tensor.*to_dense"):
            pk.projected_penalty(sparse, "C4", "regular", "regular", backend=backend)
        with pytest.raises(TypeError, match=r"items\[1\]: weight: expected a dense"):
            pk.multi_penalty([(w, "C4", "regular", "regular"), (sparse, "C4", "regular", "regular")],
                             backend=backend)


def test_cuda_backend_on_a_cpu_tensor_names_the_device():
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot serve a weight on cpu: the cuda backend "
                                           r"serves CUDA tensors only \(move the weight with \.cuda\(\)"):
        pk.projected_penalty(torch.randn(4, 4), "C4", backend="cuda")


def test_install_hints_name_commands_that_work_from_a_checkout():
    from projkernels import install_hints

    assert "projkernels[" not in install_hints.escnn_hint()
    assert install_hints.escnn_hint().startswith("pip install escnn")
    root = install_hints.source_tree()
    assert root is not None  # the tests run from the source tree
    assert install_hints.extension_hint() == f"cd {root} && pip install --no-build-isolation -e ."
    assert "PROJKERNELS_CUDA=1" in install_hints.extension_hint(cuda=True)


def test_install_hints_name_commands_that_work_from_the_archive(monkeypatch):
    # Installed from the source archive there is no checkout: "-e ." cannot work, and neither can an
    # extra (projkernels is on no index); the hints name the archive and the packages themselves.
    from projkernels import install_hints

    monkeypatch.setattr(install_hints, "source_tree", lambda: None)
    assert install_hints.install_kind() == "archive"
    hint = install_hints.extension_hint()
    assert hint.startswith("pip install --no-build-isolation") and f"projkernels-{pk.__version__}.tar.gz" in hint
    assert "-e ." not in hint
    assert install_hints.extension_hint(cuda=True).startswith("PROJKERNELS_CUDA=1 ")
    # a version specifier is quoted, or the shell reads ">=" as a redirection
    assert install_hints.extra_hint("smoke", ["phiflow>=3.4", "matplotlib"]) == "pip install 'phiflow>=3.4' matplotlib"
    assert install_hints.extra_hint("lightning", ["lightning"]) == "pip install lightning"


@pytest.mark.parametrize("kind", ["checkout", "archive"])
def test_missing_matplotlib_error_names_an_install_command(monkeypatch, kind):
    import sys
    from projkernels import install_hints
    from projkernels.integrations.plotting import plot_spectra

    if kind == "archive":
        monkeypatch.setattr(install_hints, "source_tree", lambda: None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    expected = "pip install matplotlib" if kind == "archive" else 'pip install --no-build-isolation -e ".[demo]"'
    with pytest.raises(ImportError, match="plot_spectra needs matplotlib") as info:
        plot_spectra([])
    assert str(info.value).endswith(expected)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_sparse_weight_after_a_dense_one_of_its_shape_is_still_refused(backend):
    # The configuration cache is keyed by shape: without the layout in the key, a sparse weight would
    # reuse the dense weight's entry and reach a kernel instead of the check.
    if backend not in pk.available_backends("cpu"):
        pytest.skip(f"{backend} not available")
    w = torch.randn(12, 12)
    pk.projected_penalty(w, "C4", "regular", "regular", backend=backend)
    with pytest.raises(TypeError, match=r"weight: expected a dense \(strided\) tensor"):
        pk.projected_penalty(w.to_sparse(), "C4", "regular", "regular", backend=backend)
