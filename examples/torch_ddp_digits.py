"""Data-parallel PyTorch training over Parasync's collectives: the 64-128-10 MLP on the
digits data, one process per rank.

    python -m parasync.launch -n 4 examples/torch_ddp_digits.py              # DistributedOptimizer
    torchrun --nproc-per-node 4 examples/torch_ddp_digits.py --how ddp      # DDP, "parasync" backend
    torchrun --nproc-per-node 4 examples/torch_ddp_digits.py --how hook     # DDP over Gloo + Parasync hook

Three ways to the same training, each a few lines away from single-process PyTorch:
`--how optimizer` wraps the optimizer in `parasync.torch.DistributedOptimizer` (Horovod
style: gradients averaged in fused buckets while the backward pass runs); `--how ddp` runs
plain `DistributedDataParallel` over the `"parasync"` torch.distributed backend; `--how
hook` keeps a Gloo process group for DDP's setup and reduces the gradient buckets over
Parasync with a comm hook. Every rank trains on its own shard of the data; rank 0 reports
the held-out accuracy.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import parasync.torch as pst

import _digits as D
import _torch_digits as T


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--how", choices=["optimizer", "ddp", "hook"], default="optimizer")
    D.training_args(ap, "rank", "0.1 x ranks")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)

    if args.how == "optimizer":
        pst.init()  # RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the launcher
        rank, size = pst.rank(), pst.size()
    else:
        dist.init_process_group("parasync" if args.how == "ddp" else "gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
    lr = args.lr if args.lr is not None else 0.1 * size

    model = T.model(args.seed + rank)  # differs per rank until rank 0's is broadcast
    if args.how == "optimizer":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        optimizer = pst.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        pst.broadcast_parameters(model.state_dict(), root_rank=0)
        net = model
    else:
        net = DDP(model)  # broadcasts rank 0's parameters
        if args.how == "hook":
            net.register_comm_hook(dist.new_group(backend="parasync"), pst.allreduce_hook)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)

    x, y, x_test, y_test = T.load(args.data, args.seed)
    x, y = x[rank::size], y[rank::size]  # this rank's shard
    batches = T.batches(len(y), args.batch, seed=[args.seed, rank])
    train_started = time.perf_counter()
    for _ in range(args.steps):
        i = next(batches)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[i]), y[i])
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - train_started

    report = None
    if rank == 0:
        report = {
            "mode": args.how,
            "workers": size,
            "steps": args.steps,
            "batch": args.batch,
            "lr": lr,
            "accuracy": T.accuracy(model, x_test, y_test),
            "loss": loss.item(),
            "steps_per_s": args.steps / train_seconds,
            "seconds": time.perf_counter() - started,
        }
        D.print_report(report, args.json, len(y_test), f"({size} ranks, {args.how})")
    if args.how == "optimizer":
        pst.shutdown()
    else:
        dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
