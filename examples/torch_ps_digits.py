"""PyTorch training through a parameter server: the 64-128-10 MLP on the digits data, W
worker processes, SGD applied on the `parasync server` shards.

    python examples/torch_ps_digits.py                   # its own 2-shard cluster, 4 workers, sync
    python examples/torch_ps_digits.py --mode async --json
    torchrun --nproc-per-node 4 examples/torch_ps_digits.py --addresses host:7070,host:7071
                                                          # workers of a running cluster

The training loop is PyTorch's own; `ParameterServerOptimizer` takes the optimizer's place:
it registers the model's parameters on the shards (worker 0's initial values win, the others
adopt them), and each `step()` pushes the gradients and pulls the next step's values into
the parameters in place. In sync mode the shards average the W gradients of a step before
applying them; in async mode every gradient is applied on arrival. Without `--addresses`
the example starts the shards (`parasync server`, from $PARASYNC_BIN or PATH) and the
workers itself, then scores the final weights on the held-out split.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import torch

import parasync
import parasync.torch as pst
from parasync.cluster import LocalCluster

import _digits as D
import _torch_digits as T


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    D.ps_args(ap)  # --mode, --workers, --shards, --addresses (under a launcher: else TF_CONFIG), --steps, ...
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = 0.1 * args.workers if args.mode == "sync" else 0.1
    return args


def worker(args, addresses: list[str] | None, worker_id: int, workers: int) -> dict:
    """One worker: trains for args.steps steps; returns its timing, last loss and model."""
    torch.set_num_threads(1)
    x, y, _, _ = T.load(args.data, args.seed)
    x, y = x[worker_id::workers], y[worker_id::workers]  # this worker's shard of the data
    batches = T.batches(len(y), args.batch, seed=[args.seed, worker_id])
    model = T.model(args.seed + worker_id)  # differs per worker: worker 0's values win

    client = parasync.PsClient(addresses, worker_id=worker_id)
    optimizer = pst.ParameterServerOptimizer(model, client, parasync.SGD(args.lr))
    started, dropped = time.perf_counter(), 0
    for _ in range(args.steps):
        i = next(batches)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        optimizer.step()  # push the gradients, pull the next step's values into the model
        dropped += optimizer.last_push.dropped_stale
    seconds = time.perf_counter() - started
    client.close()
    return {"seconds": seconds, "loss": loss.item(), "dropped_stale": dropped, "model": model.state_dict()}


def final_model(args, addresses: list[str]) -> torch.nn.Module:
    """What the shards hold now (sync: the values after the last step)."""
    model = T.model(args.seed)
    with parasync.PsClient(addresses, worker_id=0) as client:
        pst.ParameterServerOptimizer(model, client, parasync.SGD(args.lr), start_step=args.steps if args.mode == "sync" else 0)
    return model


def report(args, done: list[dict], net: torch.nn.Module, workers: int, shards: int, started: float) -> dict:
    _, _, x_test, y_test = T.load(args.data, args.seed)
    accuracy = T.accuracy(net, x_test, y_test)
    return D.ps_report(args, done, accuracy, workers, shards, time.perf_counter() - started, len(y_test))


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    started = time.perf_counter()
    addresses = args.addresses.split(",") if args.addresses else None
    env = os.environ
    launched = ("RANK", "WORLD_SIZE") if "RANK" in env else ("SLURM_PROCID", "SLURM_NTASKS")
    if all(v in env for v in launched):
        # One worker of a job a launcher started (torchrun, parasync.launch, srun).
        rank, size = (int(env[v]) for v in launched)
        done = worker(args, addresses, rank, size)
        if rank == 0:  # scores its own model: in sync mode, the values after the last step
            net = T.model(args.seed)
            net.load_state_dict(done["model"])
            return report(args, [done], net, size, len(addresses or []), started)
        return None

    cluster = None
    if addresses is None:
        cluster = LocalCluster(shards=args.shards, mode=args.mode, num_workers=args.workers)
        addresses = cluster.addresses
    try:
        if not args.json:
            print(f"{args.mode} mode, {len(addresses)} shard(s) at {', '.join(addresses)}; {args.workers} workers x {args.steps} steps")
        # "spawn": fresh interpreters, no forked copies of the parent's threads or sockets.
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            done = pool.starmap(worker, [(args, addresses, w, args.workers) for w in range(args.workers)])
        net = final_model(args, addresses)
    finally:
        if cluster:
            cluster.close()
    return report(args, done, net, args.workers, len(addresses), started)


if __name__ == "__main__":
    main()
