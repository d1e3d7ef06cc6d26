"""What consistent pulls cost: 64 MiB pull throughput of one shard, alone and while another
worker pushes into the same variable, for one or more `parasync` server builds side by side.

    python benches/pull_under_push.py --binary before=/tmp/parasync-old --binary after=target/release/parasync

For each round and each build (the order alternates between rounds): one `parasync server`
(``--mode async --num-workers 2 --worker-threads 2``), one 64 MiB f32 variable (SGD, lr 0),
then ``--samples`` timed pulls by worker 1 with no other traffic, then as many again while
worker 0 pushes 64 MiB gradients into the same variable in a loop (a second process). Each
figure is the median over the samples, in GB/s (1e9 B); the summary gives medians over rounds
and each build's ratio to the first one. Results are also printed as ``#json`` lines.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import numpy as np

LEN = 16 << 20  # 64 MiB of f32


def specs():
    import parasync

    return [parasync.VariableSpec("w", (LEN,), parasync.SGD(0.0))]


def pusher(addresses: list[str], stop, started) -> int:
    import parasync

    with parasync.PsClient(addresses, worker_id=0, split_bytes=1 << 40) as c:
        c.register(specs())
        grad = np.ones(LEN, dtype=np.float32)
        n = 0
        started.set()
        while not stop.is_set():
            c.push(n, [grad])
            n += 1
        return n


def pulls(c, out: np.ndarray, samples: int) -> list[float]:
    rates = []
    for _ in range(samples):
        t = time.perf_counter()
        c.pull_into(0, [out])
        rates.append(out.nbytes / (time.perf_counter() - t) / 1e9)
    return rates


def measure(binary: str, samples: int) -> dict:
    import parasync
    from parasync.cluster import LocalCluster

    args = ["--worker-threads", "2"]
    with LocalCluster(shards=1, mode="async", num_workers=2, args=args, binary=binary) as cluster:
        with parasync.PsClient(cluster.addresses, worker_id=1, split_bytes=1 << 40) as c:
            c.register(specs())
            out = np.empty(LEN, dtype=np.float32)
            pulls(c, out, 3)  # warm-up
            alone = pulls(c, out, samples)
            ctx = multiprocessing.get_context("spawn")
            stop, started = ctx.Event(), ctx.Event()
            p = ctx.Process(target=pusher, args=(cluster.addresses, stop, started))
            p.start()
            try:
                if not started.wait(60):
                    raise RuntimeError("the pushing process did not start")
                time.sleep(0.2)
                busy = pulls(c, out, samples)
            finally:
                stop.set()
                p.join(60)
                if p.is_alive():
                    p.kill()
    return {"alone_GBps": statistics.median(alone), "with_pushes_GBps": statistics.median(busy)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", action="append", required=True, help="NAME=PATH of a parasync server build")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--samples", type=int, default=15)
    a = ap.parse_args()
    builds = [tuple(b.split("=", 1)) for b in a.binary]
    results: dict[str, list[dict]] = {name: [] for name, _ in builds}
    for r in range(a.rounds):
        order = builds if r % 2 == 0 else builds[::-1]
        for name, path in order:
            m = measure(path, a.samples)
            results[name].append(m)
            print(f"round {r} {name:8s} pull 64 MiB alone {m['alone_GBps']:.2f} GB/s, with pushes {m['with_pushes_GBps']:.2f} GB/s", flush=True)
            print("#json " + json.dumps(dict(m, build=name, round=r)), flush=True)
    base = builds[0][0]
    print("| build | pull alone (GB/s) | pull with pushes (GB/s) | alone / " + base + " | with pushes / " + base + " |")
    print("| --- | --- | --- | --- | --- |")
    med = {n: {k: statistics.median(m[k] for m in ms) for k in ("alone_GBps", "with_pushes_GBps")} for n, ms in results.items()}
    for name, _ in builds:
        m = med[name]
        print(f"| {name} | {m['alone_GBps']:.2f} | {m['with_pushes_GBps']:.2f} | {m['alone_GBps'] / med[base]['alone_GBps']:.3f} | "
              f"{m['with_pushes_GBps'] / med[base]['with_pushes_GBps']:.3f} |")


if __name__ == "__main__":
    main()
