"""The penalty, projection, report and decay on distributed models, really run on 2 CPU ranks (gloo).

One subprocess (this file run as a script) spawns 2 ranks that run every scenario, under DDP and
under FSDP2 (``fully_shard`` on a 1-D CPU mesh), and save what they saw; the tests compare it with
one process running the same steps on the full model.  The model has sharded layers split evenly
and unevenly (5 rows over 2 ranks), a layer whose shard on rank 1 is empty, and the FSDP2 root's
layers (which stay unsharded after the forward).
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import projkernels as pk

WORLD = 2
STEPS = 3
LAM, LAM_G = 0.05, 0.01
DECAY = [("fsdp", "decoupled", "adam"), ("fsdp", "coupled", "sgd"), ("ddp", "coupled", "adam"),
         ("ddp", "decoupled", "sgd"), ("fsdp_default", "decoupled", "sgd"), ("fsdp_default", "coupled", "adam")]
HSDP_SHAPE = (2, 2)                # 2 replicas x 2 shards: 4 ranks
HSDP_WORLD = HSDP_SHAPE[0] * HSDP_SHAPE[1]
HSDP_DECAY = [("hsdp", "decoupled", "adam"), ("hsdp", "coupled", "sgd")]
# FSDP2 gradient divide factors of (conv1, conv2, the root); None: FSDP2's default (the average).
FACTORS = {"factor4": (4.0, 4.0, 4.0), "mixed_factors": (4.0, 1.0, None)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)     # C4 trivial -> 2 regular fields: shards [4 | 4]
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)    # regular -> 4 regular fields: shards [8 | 8]
        self.head = nn.Linear(16, 5)                   # regular -> trivial: uneven shards [3 | 2]
        self.out = nn.Linear(5, 1)                     # trivial -> trivial: shards [1 | 0] (rank 1 empty)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.out(F.relu(self.head(x.mean(dim=(2, 3)))))


def build() -> Net:
    torch.manual_seed(0)
    net = Net().double()
    pk.attach_symmetry(net.conv1, "C4", "trivial", "regular")
    pk.attach_symmetry(net.conv2, "C4", "regular", "regular")
    pk.attach_symmetry(net.head, "C4", "regular", "trivial")
    pk.attach_symmetry(net.out, "C4", "trivial", "trivial")
    return net


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64), torch.randn(4, 1, generator=g,
                                                                                  dtype=torch.float64)


def make_optimizer(kind, params):
    return torch.optim.Adam(params, lr=0.01) if kind == "adam" else torch.optim.SGD(params, lr=0.1)


# --- the ranks ----------------------------------------------------------------------------------

def _full(t):
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _params(model):
    return {n: _full(p) for n, p in model.named_parameters()}


def _grads(model):
    # Zeros for a missing gradient (an empty shard gets none), so every rank joins every gather.
    return {n: _full(p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _wrap(mode, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = build()
    if mode == "ddp":
        return DDP(net), net
    # torch's FSDP2 recipe: one fully_shard per block, then one on the root (which manages the rest).
    # "fsdp_default" passes no mesh, as torch's tutorial does: every call then builds its own default
    # mesh over all ranks; "fsdp" passes one 1-D mesh, "hsdp" one 2-D (replicate x shard) mesh.
    fsdp_kwargs = {} if mode == "fsdp_default" else {"mesh": mesh}
    for layer in (net.conv1, net.conv2):
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(net, **fsdp_kwargs)
    return net, net


def _train(model, net, rank, opt, penalty: bool):
    grads = None
    for step in range(STEPS):
        x, y = batch(step, rank)
        loss = F.mse_loss(model(x), y)
        if penalty:
            loss = loss + pk.model_penalty(model, LAM, LAM_G)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = _grads(net)
        opt.step()
    return grads


def _error(fn):
    try:
        fn()
        return None
    except Exception as err:  # noqa: BLE001  (the tests check the type and message)
        return type(err).__name__, str(err)


def _scenarios(mode, mesh, rank, calls, res):
    """The penalty, its collectives and gradient, the report, training with the penalty, the
    penalty after a forward and the projection, for one way of distributing the model."""
    from torch.distributed.tensor.debug import CommDebugMode
    model, net = _wrap(mode, mesh)
    if mode != "ddp":
        res[f"{mode}_local_rows"] = {n: p.to_local().shape[0] for n, p in net.named_parameters()}
        res[f"{mode}_meshes"] = len({id(p.device_mesh) for p in net.parameters()})
    # The penalty and its gradient alone, before any forward (FSDP2: every parameter sharded).
    del calls[:]
    with CommDebugMode() as comms:  # every collective, the gathers of DTensors included
        pen = pk.model_penalty(model, 1.0, 0.3)
    res[f"{mode}_collectives_forward"] = [numel for numel, _ in calls]
    res[f"{mode}_collective_group_sizes"] = [size for _, size in calls]
    res[f"{mode}_all_collectives"] = comms.get_total_counts()
    if mode != "ddp":
        pen.backward()
        res[f"{mode}_collectives_forward_and_backward"] = [numel for numel, _ in calls]
        res[f"{mode}_penalty_grads"] = _grads(net)
        net.zero_grad()
    res[f"{mode}_penalty"] = pen.detach().clone()
    del calls[:]
    res[f"{mode}_report"] = pk.equivariance_report(model)
    res[f"{mode}_report_collectives"] = list(calls)
    # Training with the penalty in the loss; the gradients of the first step; the final weights.
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    res[f"{mode}_train_grads"] = _train(model, net, rank, opt, penalty=True)
    res[f"{mode}_train_params"] = _params(net)
    # After the forward the FSDP2 root holds head and out unsharded: the penalty still works.
    model(batch(0, rank)[0])
    res[f"{mode}_head_after_forward"] = type(net.head.weight).__name__
    res[f"{mode}_penalty_after_forward"] = pk.model_penalty(model, 1.0, 0.3).detach().clone()
    pk.project_(model)  # reshards the FSDP2 root first: named_parameters() then gives the shards
    res[f"{mode}_projected"] = _params(net)


def _decay(mode, mesh, rank, dmode, kind, res):
    model, net = _wrap(mode, mesh)
    opt = make_optimizer(kind, net.parameters())
    pk.equivariance_decay(opt, model, LAM, LAM_G, mode=dmode)
    _train(model, net, rank, opt, penalty=False)
    res[f"decay_{mode}_{dmode}_{kind}"] = _params(net)


def _divide_factors(mode, mesh, rank, factors, key, res):
    """The penalty's gradient, and the first training step's, with FSDP2 gradient divide factors
    ``factors`` = (conv1's, conv2's, the root's; None leaves FSDP2's default, the average)."""
    for train in (False, True):
        model, net = _wrap(mode, mesh)
        for m, f in zip((net.conv1, net.conv2, net), factors):
            if f is not None:
                m.set_gradient_divide_factor(f)
        if train:
            res[f"{key}_train_grads"] = _train(model, net, rank, torch.optim.SGD(net.parameters(), lr=0.1), True)
        else:
            pk.model_penalty(model, 1.0, 0.3).backward()
            res[f"{key}_penalty_grads"] = _grads(net)


def _cut_field(mesh, res, key):
    # A shard that cuts through a field (3 regular fields of 4 rows, chunks of 6 rows); a single DTensor.
    from torch.distributed.fsdp import fully_shard
    bad = nn.Sequential(nn.Conv2d(4, 12, 3)).double()
    pk.attach_symmetry(bad[0], "C4", "regular", "regular")
    fully_shard(bad, mesh=mesh)
    res[key] = _error(lambda: pk.model_penalty(bad))
    return bad


def _worker(rank, port, out, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = []  # (numel, number of ranks of the group) of every all-reduce
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        calls.append((tensor.numel(), dist.get_world_size(group)))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    res = {}
    if world == WORLD:
        _worker_1d(rank, calls, res, init_device_mesh)
    else:
        _worker_hsdp(rank, calls, res, init_device_mesh)
    dist.all_reduce = real_all_reduce
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Results are saved: leave without the interpreter's teardown, in which a communication
    # library's background thread can still be alive and abort the process (as in the example).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker_1d(rank, calls, res, init_device_mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    # The default recipe first, in a fresh process: once meshes equal to the default one exist, torch
    # may hand out one of those objects again.
    _scenarios("fsdp_default", None, rank, calls, res)
    mesh = init_device_mesh("cpu", (WORLD,))
    for mode in ("fsdp", "ddp"):
        _scenarios(mode, mesh, rank, calls, res)
    res["local_rows"] = res["fsdp_local_rows"]
    for mode, dmode, kind in DECAY:
        _decay(mode, mesh, rank, dmode, kind, res)
    # FSDP2 summing the gradients instead of averaging them: the penalty's gradient follows.
    model, net = _wrap("fsdp", mesh)
    for m in (net.conv1, net.conv2, net):
        m.set_gradient_divide_factor(1.0)
    pk.model_penalty(model, 1.0, 0.3).backward()
    res["sum_reduction_penalty_grads"] = _grads(net)
    # Other divide factors: one for every module, and a different one per module.
    for key, factors in FACTORS.items():
        _divide_factors("fsdp_default", None, rank, factors, key, res)
    bad = _cut_field(mesh, res, "error_cut")
    res["error_single"] = _error(lambda: pk.projected_penalty(bad[0].weight, "C4", "regular", "regular"))
    # Meshes built apart: a 2-D mesh of one replica sums over the same ranks as the default 1-D mesh
    # (accepted); one that makes every rank its own shard group does not (refused, on every rank).
    for key, shape in (("mixed_same_ranks", (1, WORLD)), ("mixed_other_ranks", (WORLD, 1))):
        other = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        net = build()
        fully_shard(net.conv1, mesh=other)
        fully_shard(net.conv2)
        fully_shard(net)
        pen = []
        res[f"{key}_error"] = _error(lambda: pen.append(pk.model_penalty(net, 1.0, 0.3).detach()))
        res[f"{key}_penalty"] = pen[0] if pen else None
        res[f"{key}_report"] = _error(lambda: pk.equivariance_report(net))
    # The recipe's alternative: the same layer's weight sharded along dim 1 (2 whole input fields per rank).
    torch.manual_seed(1)
    alt = nn.Sequential(nn.Conv2d(8, 12, 3, bias=False)).double()
    pk.attach_symmetry(alt[0], "C4", "regular", "regular")
    fully_shard(alt, mesh=mesh, shard_placement_fn=lambda p: Shard(1))
    res["dim1_local_shape"] = tuple(alt[0].weight.to_local().shape)
    pen = pk.model_penalty(alt, 1.0, 0.3)
    pen.backward()
    res["dim1_penalty"], res["dim1_grad"] = pen.detach(), _full(alt[0].weight.grad)


def _worker_hsdp(rank, calls, res, init_device_mesh):
    # HSDP as torch documents it: a 2-D mesh (replicate, shard) passed to every fully_shard call.
    mesh = init_device_mesh("cpu", HSDP_SHAPE, mesh_dim_names=("replicate", "shard"))
    _scenarios("hsdp", mesh, rank, calls, res)
    for mode, dmode, kind in HSDP_DECAY:
        _decay(mode, mesh, rank, dmode, kind, res)
    _divide_factors("hsdp", mesh, rank, (2.0, 2.0, 2.0), "hsdp_factor2", res)
    _cut_field(mesh, res, "hsdp_error_cut")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    import torch.multiprocessing as mp
    torch.set_num_threads(1)
    world = int(sys.argv[2]) if len(sys.argv) > 2 else WORLD
    mp.spawn(_worker, args=(_free_port(), sys.argv[1], world), nprocs=world, join=True)
    sys.exit(0)


# --- one process, the full model -----------------------------------------------------------------

def _reference_train(mode_penalty=True, decay=None, world=WORLD):
    net = build()
    kind = decay[2] if decay else "sgd"
    opt = make_optimizer(kind, net.parameters()) if decay else torch.optim.SGD(net.parameters(), lr=0.1)
    if decay:
        pk.equivariance_decay(opt, net, LAM, LAM_G, mode=decay[1])
    grads = None
    for step in range(STEPS):
        # The ranks' losses averaged: what DDP and FSDP2 (averaging their gradients) optimise.
        loss = sum(F.mse_loss(net(x), y) for x, y in (batch(step, r) for r in range(world))) / world
        if mode_penalty and not decay:
            loss = loss + pk.model_penalty(net, LAM, LAM_G)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        opt.step()
    return grads, dict(net.named_parameters())


def _spawn(out, world):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               # CPU ranks over gloo even where a GPU is present: FSDP2's default mesh (no mesh=) is on
               # the accelerator when there is one.
               CUDA_VISIBLE_DEVICES="")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks talk over the loopback interface only
    run = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), str(world)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("ranks"), WORLD)


@pytest.fixture(scope="module")
def hsdp_ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("hsdp_ranks"), HSDP_WORLD)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# fsdp: one explicit 1-D mesh; fsdp_default: torch's recipe without mesh= (a default mesh per call);
# hsdp: a 2 x 2 (replicate, shard) mesh on 4 ranks; ddp: full copies.
MODES = ["fsdp", "fsdp_default", "hsdp", "ddp"]
SHARDED = ["fsdp", "fsdp_default", "hsdp"]


def _results(request, mode):
    return request.getfixturevalue("hsdp_ranks" if mode.startswith("hsdp") else "ranks")


def _world(mode):
    return HSDP_WORLD if mode.startswith("hsdp") else WORLD


@pytest.mark.parametrize("mode", MODES)
def test_penalty_value_is_the_single_process_value(request, mode):
    expected = pk.model_penalty(build(), 1.0, 0.3)
    after = _penalty_after_training(_world(mode))
    for r in _results(request, mode):
        _close(r[f"{mode}_penalty"], expected.detach())
        _close(r[f"{mode}_penalty_after_forward"], after)


def _trained(world=WORLD):
    _, params = _reference_train(world=world)
    net = build()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(params[n])
    return net


def _penalty_after_training(world=WORLD):
    return pk.model_penalty(_trained(world), 1.0, 0.3).detach()


def test_the_scenarios_shard_evenly_unevenly_and_emptily(ranks):
    rows = [r["local_rows"] for r in ranks]
    assert [x["conv2.weight"] for x in rows] == [8, 8]
    assert [x["head.weight"] for x in rows] == [3, 2]          # uneven: FSDP2 pads rank 1
    assert [x["out.weight"] for x in rows] == [1, 0]           # rank 1 holds nothing of it
    # After a forward the FSDP2 root holds its layers unsharded (plain tensors on the module).
    assert {r["fsdp_head_after_forward"] for r in ranks} == {"Parameter"}
    assert [r["fsdp_default_local_rows"] for r in ranks] == rows


def test_torchs_recipe_without_a_mesh_gives_every_call_its_own_mesh(ranks):
    # What the sharded functions must accept: the parameters live on several mesh objects over the
    # same ranks (one per fully_shard call: 3 with torch 2.14).  (Later DTensors on an equal mesh may
    # be handed one of those objects again, so even an explicit mesh can show up as several.)
    for r in ranks:
        assert r["fsdp_default_meshes"] > 1


def test_hsdp_shards_over_the_shard_dim_and_replicates_over_the_other(hsdp_ranks):
    rows = [r["hsdp_local_rows"] for r in hsdp_ranks]  # ranks 0, 1 and 2, 3: the two replicas
    assert [x["conv2.weight"] for x in rows] == [8, 8, 8, 8]
    assert [x["head.weight"] for x in rows] == [3, 2, 3, 2]
    assert [x["out.weight"] for x in rows] == [1, 0, 1, 0]
    assert {r["hsdp_head_after_forward"] for r in hsdp_ranks} == {"Parameter"}


def test_one_scalar_all_reduce_per_call_under_fsdp_and_none_under_ddp(ranks, hsdp_ranks):
    for r in ranks:
        for mode in ("fsdp", "fsdp_default"):
            assert r[f"{mode}_collectives_forward"] == [1]            # one all-reduce of one scalar
            assert r[f"{mode}_collective_group_sizes"] == [WORLD]
            assert r[f"{mode}_collectives_forward_and_backward"] == [1]  # the backward adds none
            assert r[f"{mode}_all_collectives"] == 1                  # no weight is gathered
            assert len(r[f"{mode}_report_collectives"]) == 1          # the report: one vector, once
        assert r["ddp_collectives_forward"] == []              # DDP's weights are full copies
        assert r["ddp_all_collectives"] == 0
    for r in hsdp_ranks:
        # Over the shard dim only (2 ranks): the replicas hold the same shards, and summing over
        # all 4 ranks would count every shard twice.
        assert r["hsdp_collectives_forward"] == [1] and r["hsdp_collective_group_sizes"] == [HSDP_SHAPE[1]]
        assert r["hsdp_collectives_forward_and_backward"] == [1] and r["hsdp_all_collectives"] == 1
        assert [size for _, size in r["hsdp_report_collectives"]] == [HSDP_SHAPE[1]]


def _single_penalty_grads():
    net = build()
    pk.model_penalty(net, 1.0, 0.3).backward()
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in net.named_parameters()}


@pytest.mark.parametrize("mode", SHARDED)
def test_fsdp_penalty_gradient_is_the_single_process_gradient(request, mode):
    net = build()
    pk.model_penalty(net, 1.0, 0.3).backward()
    params = dict(net.named_parameters())
    assert params["out.bias"].grad is None and params["head.bias"].grad is None  # no bias term there
    for r in _results(request, mode):
        got = r[f"{mode}_penalty_grads"]
        assert set(got) == set(params)
        for n, g in got.items():
            _close(g, params[n].grad if params[n].grad is not None else torch.zeros_like(g))


def test_fsdp_sum_reduction_scales_the_penalty_gradient_like_the_task_gradient(ranks):
    # With gradient_divide_factor=1 FSDP2 sums the ranks' gradients: the objective is the sum of the
    # ranks' losses, each holding the penalty once, so the penalty's gradient is WORLD times its own.
    want = _single_penalty_grads()
    for r in ranks:
        for n, g in r["sum_reduction_penalty_grads"].items():
            _close(g, WORLD * want[n])


def _factor_scales(factors, world):
    """{parameter name: world / D} for FSDP2 divide factors (conv1's, conv2's, the root's)."""
    def scale(f):
        return 1.0 if f is None else world / f
    return {n: scale(factors[0] if n.startswith("conv1.") else factors[1] if n.startswith("conv2.") else factors[2])
            for n, _ in build().named_parameters()}


@pytest.mark.parametrize("key,factors", list(FACTORS.items()) + [("hsdp_factor2", (2.0, 2.0, 2.0))],
                         ids=list(FACTORS) + ["hsdp_factor2"])
def test_a_gradient_divide_factor_scales_the_penalty_gradient_like_the_task_gradient(request, key, factors):
    # FSDP2 reduces the task gradients to sum_r g_r / D: the objective is (1 / D) sum_r loss_r, every
    # loss_r holding the penalty once, so the penalty's gradient is (world / D) times its own (2/4 for
    # D = 4 on 2 ranks; per module where the modules' factors differ).  The first training step's
    # gradient, task and penalty together, is then (world / D) times the single-process one.
    world = _world(key)
    scales = _factor_scales(factors, world)
    assert len(set(scales.values())) == (1 if key != "mixed_factors" else 3)
    want = _single_penalty_grads()
    ref_grads, _ = _reference_train(world=world)
    for r in _results(request, key):
        assert set(r[f"{key}_penalty_grads"]) == set(want)
        for n, g in r[f"{key}_penalty_grads"].items():
            _close(g, scales[n] * want[n])
        for n, g in r[f"{key}_train_grads"].items():
            _close(g, scales[n] * ref_grads[n])


def test_meshes_over_the_same_ranks_are_one_mesh_and_other_ranks_are_refused(ranks):
    expected = pk.model_penalty(build(), 1.0, 0.3).detach()
    for r in ranks:
        # conv1 on a 2-D mesh of one replica (1 x 2), the rest on default 1-D meshes: the same 2 ranks.
        assert r["mixed_same_ranks_error"] is None and r["mixed_same_ranks_report"] is None
        _close(r["mixed_same_ranks_penalty"], expected)
        # conv1 on a 2 x 1 mesh (every rank its own shard group), the rest sharded over both ranks.
        assert r["mixed_other_ranks_penalty"] is None
        for key in ("mixed_other_ranks_error", "mixed_other_ranks_report"):
            kind, msg = r[key]
            assert kind == "ValueError" and "split the ranks differently" in msg, msg
            assert "shard groups [(0,), (1,)]" in msg and "shard groups [(0, 1)]" in msg
            assert "mesh=" in msg


@pytest.mark.parametrize("mode", MODES)
def test_training_with_the_penalty_matches_one_process(request, mode):
    world = _world(mode)
    grads, params = _reference_train(world=world)
    for r in _results(request, mode):
        assert set(r[f"{mode}_train_grads"]) == set(grads)
        for n, g in r[f"{mode}_train_grads"].items():
            _close(g, grads[n])
        for n, p in r[f"{mode}_train_params"].items():
            _close(p, params[n].detach())
    # The penalty moved the weights: without it they end elsewhere.
    net_no_pen = _reference_train(mode_penalty=False, world=world)[1]
    assert (net_no_pen["conv2.weight"] - params["conv2.weight"]).abs().max() > 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_report_and_project_match_one_process(request, mode):
    expected = pk.equivariance_report(build())
    net = pk.project_(_trained(_world(mode)))
    for r in _results(request, mode):
        rows = r[f"{mode}_report"]
        assert [row["name"] for row in rows] == ["conv1", "conv2", "head", "out"]
        for got, want in zip(rows, expected):
            assert got["type"] == want["type"] and got["shape"] == want["shape"]
            for key in ("penalty", "weight_norm", "relative"):
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
            assert (got["bias_relative"] is None) == (want["bias_relative"] is None)
            if want["bias_relative"] is not None:
                assert got["bias_relative"] == pytest.approx(want["bias_relative"], rel=1e-9)
            assert list(got["spectrum"]) == list(want["spectrum"])
            for k in want["spectrum"]:
                assert got["spectrum"][k] == pytest.approx(want["spectrum"][k], rel=1e-9, abs=1e-12)
        for n, p in r[f"{mode}_projected"].items():
            _close(p, dict(net.named_parameters())[n].detach())
    assert pk.model_penalty(net) < 1e-20


@pytest.mark.parametrize("case", DECAY + HSDP_DECAY, ids=["-".join(c) for c in DECAY + HSDP_DECAY])
def test_decay_matches_one_process(request, case):
    mode, dmode, kind = case
    world = _world(mode)
    _, params = _reference_train(decay=case, world=world)
    _, plain = _reference_train(mode_penalty=False, world=world)
    for r in _results(request, mode):
        for n, p in r[f"decay_{mode}_{dmode}_{kind}"].items():
            _close(p, params[n].detach())
    assert (plain["conv2.weight"] - params["conv2.weight"]).abs().max() > 1e-6  # the decay acted


def test_a_shard_that_cuts_a_field_is_refused_with_the_recipe(ranks):
    for r in ranks:
        kind, msg = r["error_cut"]
        assert kind == "ValueError"
        assert "cuts through the output fields of size 4" in msg and "ceil(12/2) = 6" in msg
        assert "multiple of the world size" in msg and "Shard(1)" in msg


def test_a_weight_sharded_along_its_input_fields_gives_the_single_process_penalty(ranks):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, bias=False).double()
    pk.attach_symmetry(conv, "C4", "regular", "regular")
    pen = pk.model_penalty(nn.Sequential(conv), 1.0, 0.3)
    pen.backward()
    for r in ranks:
        assert r["dim1_local_shape"] == (12, 4, 3, 3)
        _close(r["dim1_penalty"], pen.detach())
        _close(r["dim1_grad"], conv.weight.grad)


def test_a_single_dtensor_names_the_model_entry_points(ranks):
    for r in ranks:
        kind, msg = r["error_single"]
        assert kind == "TypeError" and "DTensor" in msg and "model_penalty(model)" in msg


def test_hsdp_a_shard_that_cuts_a_field_names_the_shard_dim(hsdp_ranks):
    for r in hsdp_ranks:
        kind, msg = r["hsdp_error_cut"]
        assert kind == "ValueError" and "cuts through the output fields of size 4" in msg
        assert "the 2 ranks of the shard dim of its 2-D mesh" in msg and "ceil(12/2) = 6" in msg
