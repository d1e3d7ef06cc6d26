"""The Python binding measured the way the Rust benches measure the Rust API.

    python benches/python_bench.py ps --binary target/release/parasync
    python -m parasync.launch -n 4 benches/python_bench.py allreduce --sizes 4KiB,64KiB,1MiB

``ps`` mirrors ``benches/ps_throughput.rs``: one ``parasync server`` (``--mode async
--num-workers 1 --chunk-bytes 1048576 --worker-threads 2``), SGD with lr 0, the client's
defaults (data plane on). It times push and pull of one 64 MiB f32 variable and the 100 B
operations, each as the median over samples of the mean time per call (as criterion does).

``allreduce`` mirrors ``parasync allreduce-bench`` (``collective/src/bench.rs``): per size
one array allocated with numpy (``np.empty`` + ``fill(0)``, as the Rust harness's zeroed
``Vec``), 3 warm-up calls, an iteration count rank 0 sets from them (``--target-s`` per
repetition) and broadcasts, then ``--reps`` timed repetitions; each repetition's time is
the slowest rank's (allreduce max) and the figure is the median. Rank 0 prints the table
(algbw = bytes / time, busbw = algbw × 2(N−1)/N, GB = 1e9 B).

Every result is also printed as one ``#json {...}`` line; ``summary LOG`` reads those (and
the Rust tables) back from a ``run-python-bench.sh`` log and prints medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_size(s: str) -> int:
    s = s.strip()
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(s[: -len(unit)]) * mult
    return int(s)


def emit(record: dict) -> None:
    print("#json " + json.dumps(record, sort_keys=True), flush=True)


# -- parameter server ----------------------------------------------------------------------


def samples(fn, n_samples: int, iters: int) -> list[float]:
    """Mean seconds per call of ``fn`` over ``iters`` calls, ``n_samples`` times."""
    out = []
    for _ in range(n_samples):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - t) / iters)
    return out


def calibrate(fn, sample_s: float, warmup_s: float) -> int:
    """Warms ``fn`` up for ``warmup_s`` and returns the calls that take about ``sample_s``."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= warmup_s:
            break
    return max(1, int(sample_s / (el / n)))


def cmd_ps(a: argparse.Namespace) -> int:
    import numpy as np

    import parasync
    from parasync.cluster import LocalCluster

    big_len = 16 << 20  # 64 MiB of f32, as BIG in ps_throughput.rs
    server_args = ["--chunk-bytes", "1048576", "--worker-threads", "2"]
    with LocalCluster(shards=1, mode="async", num_workers=1, args=server_args, binary=a.binary) as cluster:
        kw = dict(reply_spin=a.reply_spin_us * 1e-6)
        big = parasync.PsClient(cluster.addresses, **kw)
        big.register([parasync.VariableSpec("big", [big_len], optimizer=parasync.SGD(0.0))])
        small = parasync.PsClient(cluster.addresses, **kw)
        small.register([parasync.VariableSpec("small", [25], optimizer=parasync.SGD(0.0))])

        grad = np.empty(big_len, dtype=np.float32)
        grad.fill(0.001)
        out = np.empty(big_len, dtype=np.float32)
        out.fill(0.0)
        grads, outs = [grad], [out]

        def row(name: str, secs: list[float], nbytes: int | None = None) -> None:
            med = statistics.median(secs)
            rec = {"bench": "ps", "name": name, "median_s": med, "samples": len(secs), "reply_spin_us": a.reply_spin_us}
            line = f"python ps {name:<28} median {med * 1e6:10.1f} us"
            if nbytes:
                rec["GBps"] = nbytes / med / 1e9
                line += f"  {rec['GBps']:.2f} GB/s"
            print(line, flush=True)
            emit(rec)

        if not a.small_only:
            nbytes = big_len * 4
            for name, fn in (
                ("push_64MiB_f32", lambda: big.push(0, grads)),
                ("pull_64MiB_f32", lambda: big.pull_into(0, outs)),
            ):
                for _ in range(a.big_warmup):
                    fn()
                row(name, samples(fn, a.big_samples, a.big_iters), nbytes)

        sg = np.empty(25, dtype=np.float32)
        sg.fill(0.5)
        so = np.empty(25, dtype=np.float32)
        so.fill(0.0)
        sgs, sos = [sg], [so]
        nat = small._c  # the native method without the wrapper's PushSummary (overhead split)

        def two_calls() -> None:
            small.push(0, sgs)
            small.pull_into(0, sos)

        for name, fn in (
            ("push_100B", lambda: small.push(0, sgs)),
            ("pull_100B", lambda: small.pull_into(0, sos)),
            ("push_pull_100B", two_calls),
            ("push_pull_one_call_100B", lambda: small.push_pull(0, sgs, sos)),
            ("push_pull_one_call_100B_native", lambda: nat.push_pull(0, sgs, sos)),
        ):
            iters = calibrate(fn, a.small_sample_s, a.small_warmup_s)
            row(name, samples(fn, a.small_samples, iters))
        big.close()
        small.close()
    return 0


# -- allreduce -----------------------------------------------------------------------------


def cmd_allreduce(a: argparse.Namespace) -> int:
    import numpy as np

    import parasync

    if a.no_hugepage:
        # numpy marks allocations of 4 MiB or more MADV_HUGEPAGE; this turns that off, as the
        # Rust harness allocates without --huge-pages.
        core = getattr(np, "_core", None) or np.core
        core.multiarray._set_madvise_hugepage(False)
    if a.pin_cores:
        # as `parasync allreduce-bench --pin-cores`: rank r on the r-th usable CPU (modulo)
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(os.environ["RANK"]) % len(cpus)]})
    comm = parasync.init()
    n, rank = comm.size, comm.rank
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    dt = np.dtype(np.float32)
    if rank == 0:
        print(f"# python allreduce: {n} ranks, numpy {np.__version__}, huge pages {'off' if a.no_hugepage else 'numpy default'}")
        print("#%12s %12s %6s %6s %10s %8s %8s" % ("size", "count", "type", "redop", "time", "algbw", "busbw"))
        print("#%12s %12s %6s %6s %10s %8s %8s" % ("(B)", "(elements)", "", "", "(us)", "(GB/s)", "(GB/s)"), flush=True)
    elapsed = np.zeros(1, dtype=np.float64)
    iters_buf = np.zeros(1, dtype=np.int64)

    def timed(buf: np.ndarray, iters: int) -> float:
        comm.barrier()
        t = time.perf_counter()
        for _ in range(iters):
            comm.allreduce(buf)
        elapsed[0] = time.perf_counter() - t
        comm.allreduce(elapsed, "max")
        return float(elapsed[0])

    for nbytes in sizes:
        count = nbytes // dt.itemsize
        buf = np.empty(count, dtype=dt)
        buf.fill(0.0)
        per_op = timed(buf, 3) / 3
        iters_buf[0] = min(max(int(a.target_s / max(per_op, 1e-7)), 1), 100_000)
        comm.broadcast(iters_buf, 0)
        iters = int(iters_buf[0])
        times = sorted(timed(buf, iters) / iters for _ in range(max(a.reps, 1)))
        secs = times[len(times) // 2]
        moved = count * dt.itemsize
        algbw = moved / secs / 1e9
        busbw = algbw * 2 * (n - 1) / n
        if rank == 0:
            print(" %12d %12d %6s %6s %10.1f %8.3f %8.3f" % (moved, count, "f32", "sum", secs * 1e6, algbw, busbw), flush=True)
            emit({"bench": "allreduce", "ranks": n, "bytes": moved, "time_s": secs, "algbw": algbw, "busbw": busbw,
                  "iters": iters, "reps": len(times), "hugepage": not a.no_hugepage})
        del buf
    comm.barrier()
    comm.close()
    return 0


# -- summary of a run-python-bench.sh log ---------------------------------------------------

HUGE_MIN = 4 << 20  # numpy and `--huge-pages` advise huge pages only from 4 MiB up


def read_log(path: str) -> dict:
    """(side, kind, ...) -> {round: value} from the sections of a run-python-bench.sh log."""
    import re
    from collections import defaultdict

    vals: dict = defaultdict(dict)
    section = None
    for line in open(path, errors="replace"):
        line = re.sub(r"^\[\d+\] ", "", line.rstrip("\n"))
        m = re.match(r"## \[r(\d+)\] (\S+) (\S+)(?: N=(\d+) (\S+))?", line)
        if m:
            section = (int(m.group(1)), m.group(2), m.group(3), m.group(4) and int(m.group(4)), m.group(5))
            continue
        if section is None:
            continue
        rnd, side, what, n, var = section
        if line.startswith("#json "):
            rec = json.loads(line[6:])
            if rec["bench"] in ("ps", "rust-ps"):
                vals[(side, "ps", rec["name"])][rnd] = rec.get("GBps", rec["median_s"] * 1e6)
            elif rec["bench"] == "allreduce":
                vals[(side, "ar", n, var, rec["bytes"], "busbw")][rnd] = rec["busbw"]
                vals[(side, "ar", n, var, rec["bytes"], "us")][rnd] = rec["time_s"] * 1e6
        elif side == "rust" and what == "allreduce" and re.match(r"^\s+\d+\s+\d+\s+f32", line):
            f = line.split()
            vals[(side, "ar", n, var, int(f[0]), "busbw")][rnd] = float(f[6])
            vals[(side, "ar", n, var, int(f[0]), "us")][rnd] = float(f[4])
    return vals


def cmd_summary(a: argparse.Namespace) -> int:
    """Medians over rounds, and Python/Rust per round (each round measures both sides)."""
    vals = read_log(a.log)
    nan = float("nan")

    def pooled(keys):
        return [v for k in keys for v in vals.get(k, {}).values()]

    def med(keys):
        v = pooled(keys)
        return statistics.median(v) if v else nan

    def pairs(pairs_, fn):
        out = []
        for pk, rk in pairs_:
            p, r = vals.get(pk, {}), vals.get(rk, {})
            out += [fn(p[i], r[i]) for i in sorted(p) if i in r]
        return out

    def stat(rs):
        return (statistics.median(rs), min(rs), max(rs), len(rs)) if rs else (nan, nan, nan, 0)

    if any(k[1] == "ps" for k in vals):
        summary_ps(vals, med, pairs, stat)
    summary_allreduce(vals, med, pairs, stat)
    return 0


def summary_ps(vals, med, pairs, stat) -> None:
    print("### PS, 1 shard, data plane, f32 wire")
    print("| measure | Python | Rust | Python / Rust: median per round [min, max] (rounds) | target ≥ 0.90 |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("push_64MiB_f32", "pull_64MiB_f32"):
        pk, rk = ("python", "ps", name), ("rust", "ps", name)
        r = stat(pairs([(pk, rk)], lambda x, y: x / y))
        print("| %s (GB/s) | %.2f | %.2f | %.3f [%.3f, %.3f] (%d) | %s |" % (name, med([pk]), med([rk]), *r, "met" if r[0] >= 0.9 else "**missed**"))
    print()
    print("| measure (µs per call) | Python | Rust | Python − Rust: median per round [min, max] (rounds) | target ≤ +15 µs |")
    print("| --- | --- | --- | --- | --- |")
    for name, rname in (("push_100B", "push_100B"), ("pull_100B", "pull_100B"), ("push_pull_100B", "push_pull_100B"),
                        ("push_pull_one_call_100B", "push_pull_one_call_100B"),
                        ("push_pull_one_call_100B_native", "push_pull_one_call_100B")):
        pk, rk = ("python", "ps", name), ("rust", "ps", rname)
        r = stat(pairs([(pk, rk)], lambda x, y: x - y))
        label = name if name == rname else f"{name} (vs {rname})"
        print("| %s | %.1f | %.1f | %+.1f [%+.1f, %+.1f] (%d) | %s |" % (label, med([pk]), med([rk]), *r, "met" if r[0] <= 15 else "**missed**"))


def summary_allreduce(vals, med, pairs, stat) -> None:
    one = sorted({k[4] for k in vals if k[1] == "ar" and k[2] == 1})
    if one:
        print()
        print("### allreduce N=1 (no peers): the cost of one call, µs")
        print("| size | Rust | Python | Python − Rust: median per round [min, max] (rounds) |")
        print("| --- | --- | --- | --- |")
        for b in one:
            pk, rk = ("python", "ar", 1, "plain", b, "us"), ("rust", "ar", 1, "plain", b, "us")
            r = stat(pairs([(pk, rk)], lambda x, y: x - y))
            print("| %d KiB | %.2f | %.2f | %+.2f [%+.2f, %+.2f] (%d) |" % (b >> 10, med([rk]), med([pk]), *r))
    print()
    print("### allreduce, f32, busbw GB/s (time per op, µs)")
    print("Pairs are like for like: below 4 MiB neither side asks for huge pages, so the three variants of")
    print("each round are the same configuration and are pooled; from 4 MiB up, ordinary pages (Rust plain,")
    print("numpy with MADV_HUGEPAGE off) and huge pages (Rust --huge-pages, numpy's default) are separate.")
    print()
    print("| N | size | pages | Rust | Python | Python / Rust: median [min, max] (pairs) | target ≥ 0.90 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in sorted({k[2] for k in vals if k[1] == "ar" and k[2] > 1}):
        for b in sorted({k[4] for k in vals if k[1] == "ar" and k[2] == n}):
            label = "%d KiB" % (b >> 10) if b < (1 << 20) else "%d MiB" % (b >> 20)
            groups = [("ordinary", [("plain", "plain"), ("huge", "huge"), ("small", "small")])] if b < HUGE_MIN else \
                     [("ordinary", [("plain", "plain")]), ("huge", [("huge", "huge")]), ("numpy default vs Rust plain", [("huge", "plain")])]
            for pages, variants in groups:
                key = lambda side, var, what: (side, "ar", n, var, b, what)
                pb = [key("python", pv, "busbw") for pv, _ in variants]
                rb = [key("rust", rv, "busbw") for _, rv in variants]
                pt = [key("python", pv, "us") for pv, _ in variants]
                rt = [key("rust", rv, "us") for _, rv in variants]
                r = stat(pairs(list(zip(pb, rb)), lambda x, y: x / y))
                verdict = "met" if r[0] >= 0.9 else "**missed**"
                if pages.startswith("numpy default"):
                    verdict = "(as worded)"
                print("| %d | %s | %s | %.3f (%.1f) | %.3f (%.1f) | %.3f [%.3f, %.3f] (%d) | %s |"
                      % (n, label, pages, med(rb), med(rt), med(pb), med(pt), *r, verdict))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ps", help="PsClient: 64 MiB push/pull and 100 B round trips through one shard")
    p.add_argument("--binary", default=os.environ.get("PARASYNC_BIN"), help="the parasync program (default $PARASYNC_BIN, PATH)")
    p.add_argument("--big-samples", type=int, default=15, help="samples of the 64 MiB ops (criterion: 15)")
    p.add_argument("--big-iters", type=int, default=4, help="calls per 64 MiB sample")
    p.add_argument("--big-warmup", type=int, default=8, help="warm-up calls per 64 MiB op")
    p.add_argument("--small-samples", type=int, default=30, help="samples of the 100 B ops (criterion: 30)")
    p.add_argument("--small-sample-s", type=float, default=0.1, help="seconds per 100 B sample")
    p.add_argument("--small-warmup-s", type=float, default=1.0, help="warm-up seconds per 100 B op")
    p.add_argument("--reply-spin-us", type=float, default=0.0, help="PsClient reply_spin, microseconds")
    p.add_argument("--small-only", action="store_true", help="only the 100 B ops")
    p.set_defaults(fn=cmd_ps)
    p = sub.add_parser("allreduce", help="Communicator.allreduce on f32 numpy arrays (run under parasync.launch)")
    p.add_argument("--sizes", default="4KiB,64KiB,1MiB,16MiB,64MiB")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--target-s", type=float, default=0.2, help="seconds per timed repetition")
    p.add_argument("--no-hugepage", action="store_true", help="turn off numpy's MADV_HUGEPAGE for large arrays")
    p.add_argument("--pin-cores", action="store_true", help="pin rank r to the r-th usable CPU (modulo)")
    p.set_defaults(fn=cmd_allreduce)
    p = sub.add_parser("summary", help="medians and Python/Rust ratios of a run-python-bench.sh log")
    p.add_argument("log")
    p.set_defaults(fn=cmd_summary)
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
