"""Checkpoint write and restore time of one shard holding 1 GiB of f32 variables with Adam
slots (a 3 GiB file), against the disk's sequential write speed measured in the same run.

    python benches/checkpoint_bench.py --binary target/release/parasync --dir /var/tmp/ckpt-bench

Each round: ``dd if=/dev/zero of=DIR/dd.bin bs=8M oflag=direct conv=fsync`` of as many bytes
as the checkpoint file; then one `parasync server` (``--mode async --num-shards 1
--checkpoint-dir DIR``) with four 256 MiB f32 variables (Adam), one gradient pushed into each so
the slots hold real data, and a checkpoint asked for through ``PsClient.checkpoint``: its time
is the shard's own (files written, fsynced, renamed, folder fsynced). Then the server is killed
and a new one started with ``--restore latest``: the restore time is the time from starting the
process until it listens (it restores before listening), minus the same for a server that
restores nothing; the page cache is dropped first when this runs as root (else said so).
Medians over rounds; results also as ``#json`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

VARS = 4
LEN = 64 << 20  # 256 MiB of f32 each


def specs():
    import parasync

    return [parasync.VariableSpec(f"w{i}", (LEN,), parasync.Adam(1e-3), init=parasync.Uniform(-1, 1, seed=i)) for i in range(VARS)]


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dd(path: Path, nbytes: int) -> float:
    count = -(-nbytes // (8 << 20))
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=8M", f"count={count}", "oflag=direct", "conv=fsync"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - t
    path.unlink()
    return count * (8 << 20) / seconds / 1e9


def start(binary: str, args: list[str]):
    from parasync.cluster import LocalCluster

    t = time.perf_counter()
    c = LocalCluster(1, "async", 1, args, binary=binary)
    return c, time.perf_counter() - t


def one_round(binary: str, root: Path) -> dict:
    import parasync

    ckpt = root / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    args = ["--num-shards", "1", "--checkpoint-dir", str(ckpt), "--keep-checkpoints", "1"]
    cluster, _ = start(binary, args)
    try:
        with parasync.PsClient(cluster.addresses, split_bytes=1 << 40, timeout=600) as c:
            c.register(specs())
            grad = np.full(LEN, 0.01, dtype=np.float32)
            c.push(0, [grad] * VARS)
            files = c.checkpoint(1)
    finally:
        cluster.close()
    f = files[0]
    file_bytes = f["bytes"]
    write_gbs = file_bytes / f["seconds"] / 1e9
    disk_gbs = dd(root / "dd.bin", file_bytes)

    dropped = drop_caches()
    cluster, restore_s = start(binary, args + ["--restore", "latest"])
    try:
        with parasync.PsClient(cluster.addresses, split_bytes=1 << 40, timeout=600) as c:
            info = c.shard_info()[0]
            assert info["restored_step"] == 1, info
            assert sorted(n for n, _ in info["variables"]) == [f"w{i}" for i in range(VARS)], info
    finally:
        cluster.close()
    drop_caches()
    empty = root / "empty"
    shutil.rmtree(empty, ignore_errors=True)
    cluster, plain_s = start(binary, ["--num-shards", "1", "--checkpoint-dir", str(empty), "--restore", "latest"])
    cluster.close()
    shutil.rmtree(empty, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    restore_only = restore_s - plain_s
    return {
        "file_bytes": file_bytes,
        "write_s": f["seconds"],
        "write_gbs": write_gbs,
        "dd_gbs": disk_gbs,
        "write_vs_dd": write_gbs / disk_gbs,
        "restore_s": restore_only,
        "restore_gbs": file_bytes / restore_only / 1e9,
        "cache_dropped": dropped,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/parasync")
    p.add_argument("--dir", default="/var/tmp/parasync-checkpoint-bench", help="a folder on the disk to measure")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(a.rounds):
        row = one_round(a.binary, root)
        row["round"] = r
        rows.append(row)
        print(f"round {r}: checkpoint {row['file_bytes'] / 2**30:.2f} GiB in {row['write_s']:.2f} s = {row['write_gbs']:.2f} GB/s, "
              f"dd {row['dd_gbs']:.2f} GB/s ({row['write_vs_dd']:.2f}); restore {row['restore_s']:.2f} s = "
              f"{row['restore_gbs']:.2f} GB/s (page cache dropped: {row['cache_dropped']})", flush=True)
        print("#json " + json.dumps(row), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("write_s", "write_gbs", "dd_gbs", "write_vs_dd", "restore_s", "restore_gbs")}
    print(f"median of {len(rows)}: write {med['write_gbs']:.2f} GB/s vs dd {med['dd_gbs']:.2f} GB/s = {med['write_vs_dd']:.3f} "
          f"(per-round ratios {[round(r['write_vs_dd'], 3) for r in rows]}); restore {med['restore_s']:.2f} s "
          f"({med['restore_gbs']:.2f} GB/s)")
    print("#json " + json.dumps({"median": med, "rounds": len(rows), "cpus": os.cpu_count()}))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
