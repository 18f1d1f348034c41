# examples/distributed_penalty.py
"""The equivariance penalty on a sharded (FSDP2) or replicated (DDP) model.

    torchrun --nproc_per_node=2 examples/distributed_penalty.py          # FSDP2
    torchrun --nproc_per_node=2 examples/distributed_penalty.py --ddp    # DDP
    python examples/distributed_penalty.py                               # spawns 2 ranks itself

CPU ranks talk over gloo; with a GPU per rank, NCCL.  Each rank penalises its own shards and one
all-reduce of one scalar per call adds them up.
"""
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import projkernels as pk


def main(rank: int, world: int) -> None:
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).to(device)
    # C4 G-CNN layout: 4 regular fields per conv; shards of 2 fields each on 2 ranks.
    pk.attach_regular_gcnn(model, "C4", layer_types=(nn.Conv2d, nn.Linear), last_out="trivial")
    if "--ddp" in sys.argv:
        model = DDP(model, device_ids=[rank] if use_cuda else None)
    else:
        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1 + rank)  # each rank its own batches
    for step in range(5):
        x = torch.randn(8, 1, 12, 12, device=device)
        y = torch.randint(0, 10, (8,), device=device)
        penalty = pk.model_penalty(model, lambda_perp=1e-2)  # the same global value on every rank
        loss = F.cross_entropy(model(x), y) + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}  penalty {penalty.item():.5f}")
    report = pk.equivariance_report(model)  # a collective too: every rank calls it
    if rank == 0:
        print(pk.format_report(report))
    # Leave together: a rank tearing gloo down while its peer still uses the connection can abort.
    dist.barrier()
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks are on this machine
    main(rank, world)
    # The work is done and the process group is gone: leave without the interpreter's teardown, in
    # which a communication library's background thread can still be alive and abort the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if "RANK" in os.environ:  # launched by torchrun
        main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    else:  # plain python: start 2 ranks on this machine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_spawned, args=(2, port), nprocs=2, join=True)
