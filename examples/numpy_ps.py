"""Data-parallel training through a parameter server: a 64-128-10 numpy MLP on the digits
data, W worker processes, SGD applied on the `parasync server` shards.

    python examples/numpy_ps.py                      # its own 2-shard cluster, 4 workers, sync
    python examples/numpy_ps.py --mode async --json
    python examples/numpy_ps.py --addresses host:7070,host:7071 --workers 4   # an existing cluster

Each worker registers the same variables (initial values from a seeded RNG, so they are
identical everywhere; the first registration wins), then per step computes gradients on a
mini-batch of its own shard of the training data and pushes them; `push_pull` returns the
values for the next step in the same round trip. In sync mode the shards average the W
gradients of a step before applying them; in async mode every gradient is applied on
arrival. At the end the parent pulls the final weights and scores the held-out split.
The server is the `parasync` program: $PARASYNC_BIN, else `parasync` on PATH.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import parasync
from parasync.cluster import LocalCluster

import _digits as D


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    D.ps_args(ap)
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = 0.1 * args.workers if args.mode == "sync" else 0.1
    return args


def specs(args) -> list[parasync.VariableSpec]:
    init = D.unflatten(D.init_params(args.seed))
    return [parasync.VariableSpec(name, shape, parasync.SGD(args.lr), init=init[name]) for name, shape in D.SHAPES.items()]


def worker(args, addresses: list[str], worker_id: int) -> dict:
    """One worker process: returns its timing and last loss."""
    x, y, _, _ = D.load(args.data, args.seed)
    x, y = x[worker_id :: args.workers], y[worker_id :: args.workers]  # this worker's shard
    batches = D.batches(len(y), args.batch, seed=[args.seed, worker_id])
    with parasync.PsClient(addresses, worker_id=worker_id) as ps:
        ps.register(specs(args))
        params, grads = ps.empty(), ps.empty()
        ps.pull_into(0, params)
        started, dropped = time.perf_counter(), 0
        for step in range(args.steps):
            i = next(batches)
            loss = D.loss_and_grads(params, x[i], y[i], grads)
            # Pushes this step's gradients; receives the values for step + 1 into `params`.
            dropped += ps.push_pull(step, grads, params).dropped_stale
        return {"seconds": time.perf_counter() - started, "loss": loss, "dropped_stale": dropped}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    cluster = None
    if args.addresses:
        addresses = args.addresses.split(",")
    else:
        cluster = LocalCluster(shards=args.shards, mode=args.mode, num_workers=args.workers)
        addresses = cluster.addresses
    try:
        if not args.json:
            print(f"{args.mode} mode, {len(addresses)} shard(s) at {', '.join(addresses)}; {args.workers} workers x {args.steps} steps")
        # "spawn": fresh interpreters, no forked copies of the parent's threads or sockets.
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            done = pool.starmap(worker, [(args, addresses, w) for w in range(args.workers)])
        # What the shards hold now (sync: the values after the last step).
        _, _, x_test, y_test = D.load(args.data, args.seed)
        with parasync.PsClient(addresses, worker_id=0) as ps:
            ps.register(specs(args))
            params = ps.pull(args.steps if args.mode == "sync" else 0)
    finally:
        if cluster:
            cluster.close()
    accuracy = D.accuracy(params, x_test, y_test)
    return D.ps_report(args, done, accuracy, args.workers, len(addresses), time.perf_counter() - started, len(y_test))


if __name__ == "__main__":
    main()
