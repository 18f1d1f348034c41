"""Lightning callback, TensorBoard writer and spectra plot: what they add to training and what they log,
read back from the loggers' own files (Lightning's CSV logger, TensorBoard's event files)."""
import csv
import glob
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import projkernels as pk
from projkernels.integrations import report_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAMBDA = 0.7


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 2 * 4, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * 4, 2 * 4, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(2 * 4, 1, 3, padding=1))
    pk.attach_regular_gcnn(net, "C4", first_in="trivial", last_out="trivial")
    return net


def _data(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randn(n, 1, 6, 6, generator=g)


def test_report_metrics_are_the_report():
    net = _net()
    rows = pk.equivariance_report(net)
    m = report_metrics(net)
    for r in rows:
        assert m[f"equivariance/{r['name']}/relative"] == pytest.approx(r["relative"], rel=1e-12)
        total = sum(r["spectrum"].values())
        shares = [m[f"equivariance/{r['name']}/spectrum/{k}"] for k in r["spectrum"]]
        assert shares == pytest.approx([v / total for v in r["spectrum"].values()], rel=1e-12)
        assert sum(shares) == pytest.approx(1.0)
    assert m["equivariance/penalty"] == pytest.approx(sum(r["penalty"] for r in rows), rel=1e-12)
    with pytest.raises(TypeError, match="model_or_report"):
        report_metrics(3)


# --- TensorBoard ---------------------------------------------------------------------------------

def test_tensorboard_write_report_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from projkernels.integrations.tensorboard import write_report

    net = _net()
    writer = SummaryWriter(str(tmp_path))
    first = write_report(writer, net, 0)
    with torch.no_grad():
        net[2].weight.copy_(pk.project(net[2].weight, "C4", "regular", "regular"))  # layer "2" made equivariant
    second = write_report(writer, net, 7)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    for step, rows in ((0, first), (7, second)):
        for r in rows:
            events = {e.step: e.value for e in acc.Scalars(f"equivariance/{r['name']}/relative")}
            assert events[step] == pytest.approx(r["relative"], rel=1e-6, abs=1e-7)
            hist = {e.step: e.histogram_value for e in acc.Histograms(f"equivariance/{r['name']}/spectrum")}[step]
            total = sum(r["spectrum"].values())
            assert list(hist.bucket) == pytest.approx([v / total for v in r["spectrum"].values()], rel=1e-6, abs=1e-12)
            assert list(hist.bucket_limit) == [0.0, 1.0, 2.0]  # C4's irreps "0", "1", "2"
    assert {e.step: e.value for e in acc.Scalars("equivariance/2/relative")}[7] < 1e-6
    assert {e.step: e.value for e in acc.Scalars("equivariance/2/relative")}[0] > 0.1
    with pytest.raises(ValueError, match="spectrum"):
        write_report(SummaryWriter(str(tmp_path / "x")), net, 0, spectrum="bars")


def test_tensorboard_write_report_figure_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from projkernels.integrations.tensorboard import write_report

    net = _net()
    writer = SummaryWriter(str(tmp_path))
    rows = write_report(writer, net, 3, spectrum="figure", prefix="eq")
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0, "histograms": 0}).Reload()
    tags = acc.Tags()
    assert tags["images"] == ["eq/spectra"] and tags["histograms"] == []  # the figure instead of histograms
    (image,) = acc.Images("eq/spectra")
    assert image.step == 3 and image.width > 100 and image.height > 100
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows:
        assert acc.Scalars(f"eq/{r['name']}/relative")[0].value == pytest.approx(r["relative"], rel=1e-6)


def test_plot_spectra_bars_are_the_shares(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    from projkernels.integrations.plotting import plot_spectra

    net = _net()
    rows = pk.equivariance_report(net)
    fig = plot_spectra(net, path=str(tmp_path / "spectra.png"))
    bars = [p for p in fig.axes[0].patches]
    expected = [max(v / sum(r["spectrum"].values()), 1e-16) for r in rows for v in r["spectrum"].values()]
    assert [b.get_height() for b in bars] == pytest.approx(expected, rel=1e-12)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [r["name"] for r in rows]
    assert os.path.getsize(tmp_path / "spectra.png") > 1000


# --- Lightning -----------------------------------------------------------------------------------

def _lightning_module(net, data, lr, opt="sgd"):
    L = pytest.importorskip("lightning.pytorch")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            cls = torch.optim.SGD if opt == "sgd" else torch.optim.Adam
            return cls(self.parameters(), lr=lr)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=len(data[0]))

    return Module()


def _fit(module, callback, tmp_path, steps):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=logger, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    return logger


def _csv_rows(logger):
    with open(os.path.join(logger.log_dir, "metrics.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def test_lightning_penalty_gradients_are_those_of_loss_plus_penalty(tmp_path):
    pytest.importorskip("lightning")
    from projkernels.integrations.lightning import EquivarianceCallback

    data = _data()
    # Expected: the same net, the penalty in the loss, autograd.
    ref = _net()
    loss = F.mse_loss(ref(data[0]), data[1]) + pk.model_penalty(ref, LAMBDA)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in ref.named_parameters()}
    report0 = pk.equivariance_report(ref)

    module = _lightning_module(_net(), data, lr=0.05)
    logger = _fit(module, EquivarianceCallback(LAMBDA, log_every_n_steps=1), tmp_path, steps=1)
    for n, p in module.net.named_parameters():
        # the penalty reaches every attached weight and regular-field bias; the last bias (trivial
        # output) gets the task gradient only
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-6, atol=1e-7, msg=n)
    # The update is SGD's with those gradients.
    for (n, p), (_, q) in zip(module.net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - 0.05 * expected[n], rtol=1e-6, atol=1e-7)

    rows = _csv_rows(logger)
    by_step = {int(r["step"]): r for r in rows if r.get("equivariance/net.0/relative")}
    assert sorted(by_step) == [0, 1]
    for r in report0:
        assert float(by_step[0][f"equivariance/net.{r['name']}/relative"]) == pytest.approx(r["relative"], rel=1e-6)
        total = sum(r["spectrum"].values())
        for k, v in r["spectrum"].items():
            assert float(by_step[0][f"equivariance/net.{r['name']}/spectrum/{k}"]) == pytest.approx(v / total, rel=1e-5)
    after = pk.equivariance_report(module)  # names as the module has them: "net.0", ...
    for r in after:
        assert float(by_step[1][f"equivariance/{r['name']}/relative"]) == pytest.approx(r["relative"], rel=1e-6)
    assert float(by_step[0]["equivariance/objective"]) == pytest.approx(
        float(pk.model_penalty(_net(), LAMBDA).detach()), rel=1e-6)


def test_lightning_decoupled_decay_acts_before_the_update(tmp_path):
    pytest.importorskip("lightning")
    from projkernels.integrations.lightning import EquivarianceCallback

    data, lr = _data(), 0.01
    # Expected: W <- W - lr * d(penalty)/dW at the weights the gradients were taken at, then Adam's update
    # with the task gradient alone (the decay never enters Adam's moments).
    ref = _net()
    F.mse_loss(ref(data[0]), data[1]).backward()
    pen_grads = torch.autograd.grad(pk.model_penalty(ref, LAMBDA), list(ref.parameters()), allow_unused=True)
    opt = torch.optim.Adam(ref.parameters(), lr=lr)
    with torch.no_grad():
        for p, g in zip(ref.parameters(), pen_grads):
            if g is not None:
                p.sub_(g, alpha=lr)
    opt.step()

    module = _lightning_module(_net(), data, lr=lr, opt="adam")
    _fit(module, EquivarianceCallback(LAMBDA, mode="decoupled", log_every_n_steps=None), tmp_path, steps=1)
    for (n, p), q in zip(module.net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=n)
    # and it did act: without it, the first layer's weight differs
    plain = _net()
    F.mse_loss(plain(data[0]), data[1]).backward()
    torch.optim.Adam(plain.parameters(), lr=lr).step()
    assert (plain[0].weight - module.net[0].weight).abs().max() > 1e-4


def test_lightning_callback_errors_name_the_argument():
    pytest.importorskip("lightning")
    from projkernels.integrations.lightning import EquivarianceCallback
    with pytest.raises(ValueError, match="mode"):
        EquivarianceCallback(mode="coupled")
    with pytest.raises(ValueError, match="lambda_perp"):
        EquivarianceCallback(-1.0)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        EquivarianceCallback(log_every_n_steps=0)


def test_lightning_logs_to_every_logger_tensorboard_included(tmp_path):
    # Two loggers: the CSV file and TensorBoard's event files both get the report; TensorBoard also gets
    # each layer's spectrum as a histogram.  mode="log": nothing is added to the gradients.
    pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from projkernels.integrations.lightning import EquivarianceCallback

    data = _data()
    ref = _net()
    F.mse_loss(ref(data[0]), data[1]).backward()  # the task gradient alone
    report0 = pk.equivariance_report(ref)

    module = _lightning_module(_net(), data, lr=0.05)
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=[csv_logger, tb_logger],
                        callbacks=[EquivarianceCallback(LAMBDA, mode="log", log_every_n_steps=2)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    tb_logger.experiment.flush()
    after = pk.equivariance_report(module)

    csv_rows = {int(r["step"]): r for r in _csv_rows(csv_logger) if r.get("equivariance/net.0/relative")}
    assert sorted(csv_rows) == [0, 2]  # every 2 optimizer steps, starting before training
    assert float(csv_rows[0]["equivariance/objective"]) == 0.0
    acc = EventAccumulator(tb_logger.log_dir, size_guidance={"scalars": 0, "histograms": 0}).Reload()
    for step, rows in ((0, report0), (2, after)):
        for r in rows:
            name = r["name"] if r["name"].startswith("net.") else f"net.{r['name']}"
            tag = f"equivariance/{name}/relative"
            assert float(csv_rows[step][tag]) == pytest.approx(r["relative"], rel=1e-6)
            assert {e.step: e.value for e in acc.Scalars(tag)}[step] == pytest.approx(r["relative"], rel=1e-6)
            hist = {e.step: e.histogram_value for e in acc.Histograms(f"equivariance/{name}/spectrum")}[step]
            total = sum(r["spectrum"].values())
            assert list(hist.bucket) == pytest.approx([v / total for v in r["spectrum"].values()], rel=1e-5)
    assert sorted(e.step for e in acc.Scalars("equivariance/net.0/relative")) == [0, 2]
    # mode="log" leaves the training alone: after one more step of the same SGD, the first step's
    # gradients were the task's
    one = _lightning_module(_net(), data, lr=0.05)
    _fit(one, EquivarianceCallback(LAMBDA, mode="log", log_every_n_steps=None), tmp_path / "one", steps=1)
    for n, p in one.net.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad, rtol=1e-6, atol=1e-7, msg=n)


def test_lightning_fsdp1_strategy_is_refused_naming_fsdp2():
    # Lightning's FSDPStrategy needs a GPU to run; the refusal is checked on the strategy object itself.
    pytest.importorskip("lightning")
    import types
    from lightning.pytorch.strategies import FSDPStrategy
    from projkernels.integrations.lightning import EquivarianceCallback

    trainer = types.SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(TypeError, match=r"trainer: Lightning's FSDPStrategy.*ModelParallelStrategy.*fully_shard"):
        EquivarianceCallback().on_fit_start(trainer, _lightning_module(_net(), _data(), lr=0.05))


def test_lightning_callback_refuses_a_module_with_nothing_attached(tmp_path):
    pytest.importorskip("lightning")
    from projkernels.integrations.lightning import EquivarianceCallback

    module = _lightning_module(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)), _data(), lr=0.05)
    with pytest.raises(ValueError, match="pl_module: no layer has a symmetry attached"):
        _fit(module, EquivarianceCallback(), tmp_path, steps=1)


DISTRIBUTED_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch, torch.nn.functional as F
    from torch import nn
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger
    import projkernels as pk
    from projkernels.integrations.lightning import EquivarianceCallback

    strategy_name, out = sys.argv[1], sys.argv[2]
    LAMBDA = 0.7

    def net():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(1, 2 * 4, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * 4, 2 * 4, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(2 * 4, 1, 3, padding=1))
        pk.attach_regular_gcnn(m, "C4", first_in="trivial", last_out="trivial")
        return m

    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(8, 1, 6, 6, generator=g), torch.randn(8, 1, 6, 6, generator=g)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()
        def configure_model(self):
            if strategy_name == "fsdp2":
                from torch.distributed.fsdp import fully_shard
                for i in (0, 2, 4):
                    fully_shard(self.net[i], mesh=self.device_mesh)
                fully_shard(self.net, mesh=self.device_mesh)
        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1])
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)
        def train_dataloader(self):
            # each rank gets its own half of the batch (DistributedSampler, no shuffle)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=4)

    if strategy_name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    module = Module()
    logger = CSVLogger(os.path.join(out, "logs"), name="run")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=logger,
                        callbacks=[EquivarianceCallback(LAMBDA, log_every_n_steps=1)], use_distributed_sampler=True,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    full = {}
    for n, p in module.net.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        full[n] = grad.tolist()
    if trainer.global_rank == 0:
        json.dump({"grads": full, "log_dir": logger.log_dir}, open(os.path.join(out, "result.json"), "w"))
''')


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lightning_distributed_gradients_are_exact(tmp_path, strategy):
    pytest.importorskip("lightning")
    import json
    script = tmp_path / "fit.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script), strategy, str(tmp_path)], cwd=str(tmp_path),
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.load(open(tmp_path / "result.json"))
    # Expected: the mean of the two ranks' losses (DDP / FSDP2 average the gradients) plus the penalty,
    # in one process.
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(8, 1, 6, 6, generator=g), torch.randn(8, 1, 6, 6, generator=g)
    ref = _net()
    # DistributedSampler without shuffle: rank r gets samples r, r + 2, r + 4, r + 6
    loss = sum(F.mse_loss(ref(xs[r::2]), ys[r::2]) for r in range(2)) / 2 + pk.model_penalty(ref, LAMBDA)
    loss.backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(torch.tensor(result["grads"][n]), p.grad, rtol=1e-5, atol=1e-6, msg=n)
    with open(os.path.join(result["log_dir"], "metrics.csv"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("equivariance/net.0/relative")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    for r in pk.equivariance_report(_net()):
        assert float(rows[0][f"equivariance/net.{r['name']}/relative"]) == pytest.approx(r["relative"], rel=1e-6)
