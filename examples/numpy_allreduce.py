"""Data-parallel training with collectives: the 64-128-10 numpy MLP on the digits data,
one process per rank, gradients averaged with one allreduce per step.

    python -m parasync.launch -n 4 examples/numpy_allreduce.py
    torchrun --nproc-per-node 4 examples/numpy_allreduce.py --json

Rank 0 draws the initial weights and broadcasts them, so every rank starts from the same
model. Each step every rank computes gradients on a mini-batch of its own shard of the
training data, straight into one flat float32 buffer (the per-variable arrays are views of
it); a single `allreduce(grads, "avg")` averages that buffer in place over all ranks, and
every rank applies the same SGD update, so the replicas stay identical without a server.
Rank 0 reports the held-out accuracy.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import parasync

import _digits as D


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    D.training_args(ap, "rank", "0.1 x ranks")
    args = ap.parse_args(argv)
    started = time.perf_counter()

    with parasync.init() as comm:  # RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the launcher
        rank, size = comm.rank, comm.size
        lr = args.lr if args.lr is not None else 0.1 * size
        x, y, x_test, y_test = D.load(args.data, args.seed)
        x, y = x[rank::size], y[rank::size]  # this rank's shard
        batches = D.batches(len(y), args.batch, seed=[args.seed, rank])

        params = D.init_params(args.seed) if rank == 0 else np.empty(D.SIZE, dtype=np.float32)
        comm.broadcast(params, root=0)
        grads = np.zeros_like(params)
        p, g = D.unflatten(params), D.unflatten(grads)  # named views: no copies

        train_started = time.perf_counter()
        for step in range(args.steps):
            i = next(batches)
            loss = D.loss_and_grads(p, x[i], y[i], g)  # writes into `grads`
            comm.allreduce(grads, "avg")  # all four gradients in one collective, in place
            params -= lr * grads
        train_seconds = time.perf_counter() - train_started

    if rank == 0:
        report = {
            "mode": "allreduce",
            "workers": size,
            "shards": 0,
            "steps": args.steps,
            "batch": args.batch,
            "lr": lr,
            "accuracy": D.accuracy(p, x_test, y_test),
            "loss": loss,
            "steps_per_s": args.steps / train_seconds,
            "seconds": time.perf_counter() - started,
        }
        D.print_report(report, args.json, len(y_test), f"({size} ranks)")


if __name__ == "__main__":
    main()
