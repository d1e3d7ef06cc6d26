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
import json
import time

import numpy as np

import parasync

import _digits as D


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500, help="steps (each rank)")
    ap.add_argument("--batch", type=int, default=32, help="mini-batch per rank and step")
    ap.add_argument("--lr", type=float, help="learning rate (default: 0.1 x ranks)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights, the batches")
    ap.add_argument("--data", help=f"the digits gzip CSV (default: {D.DATA})")
    ap.add_argument("--json", action="store_true", help="rank 0 prints one JSON line with the results")
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
        if args.json:
            print(json.dumps(report), flush=True)
        else:
            print(f"held-out accuracy {report['accuracy']:.4f} ({len(y_test)} rows), last loss {loss:.4f}")
            print(f"{report['steps_per_s']:.0f} steps/s, {report['seconds']:.1f} s in all ({size} ranks)")


if __name__ == "__main__":
    main()
