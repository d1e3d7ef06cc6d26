"""One rank of the collective tests: runs every op on every dtype, saves the results."""

import json
import os
import signal
import sys
import time

import ml_dtypes
import numpy as np

import parasync

DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64, "bfloat16": ml_dtypes.bfloat16}


def inputs(rank: int, dtype: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * rank + len(dtype) + n)
    if dtype.startswith("int"):
        return rng.integers(-1000, 1000, n).astype(DTYPES[dtype])
    return rng.standard_normal(n).astype(DTYPES[dtype])


cfg = json.loads(sys.argv[1])
rank, size = cfg["rank"], cfg["size"]
comm = parasync.Communicator(rank, size, cfg["master"], timeout=cfg.get("timeout", 30))

if cfg.get("kill_rank") is not None:
    comm.barrier()
    if rank == cfg["kill_rank"]:
        # Let the barrier's last messages leave first (over TLS they pass through a thread
        # of this process, which dies with it).
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    started = time.monotonic()
    try:
        comm.allreduce(np.ones(1 << 16, np.float32))
        comm.allreduce(np.ones(4, np.float32))
        print(json.dumps({"error": None}))
    except parasync.PeerError as e:
        print(json.dumps({"error": type(e).__name__, "rank": e.rank, "seq": e.seq, "message": str(e),
                          "elapsed": time.monotonic() - started}))
    sys.exit(0)

results = {}
for n in cfg["sizes"]:
    for dt in DTYPES:
        x = inputs(rank, dt, n)
        for op in ("sum", "avg", "min", "max"):
            a = x.copy()
            comm.allreduce(a, op)
            results[f"allreduce-{op}-{dt}-{n}"] = a
        a = x.copy()
        results[f"allreduce_async-sum-{dt}-{n}"] = comm.allreduce_async(a, "sum").wait()
        a = x.copy()
        results[f"broadcast-{dt}-{n}"] = comm.broadcast(a, size - 1)
        recv = np.zeros(n * size, DTYPES[dt])
        results[f"allgather-{dt}-{n}"] = comm.allgather(x, recv)
        blocks = np.concatenate([x] * size)
        recv = np.zeros(n, DTYPES[dt])
        results[f"reduce_scatter-sum-{dt}-{n}"] = comm.reduce_scatter(blocks, recv, "sum")
        works = [comm.allgather_async(x, np.zeros(n * size, DTYPES[dt])), comm.barrier_async()]
        results[f"allgather_async-{dt}-{n}"] = works[0].wait()
        assert works[1].wait() is None and works[1].done()
comm.barrier()
comm.close()
np.savez(cfg["out"], **{k: v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v for k, v in results.items()})
print(json.dumps({"rank": rank, "ok": True}))
