"""Start N ranks of a program on this host, as torchrun would:

    python -m parasync.launch -n 4 train.py --epochs 3

Each rank gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` (a free port on 127.0.0.1 unless ``--master-port``), so
``parasync.init()`` finds the job. Rank outputs are prefixed with ``[rank]``. When a rank
fails, the others get ``--grace`` seconds to notice (they raise ``PeerError``) before they
are killed; the exit code is the first failing rank's.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pump(prefix: str, stream, out) -> None:
    for line in iter(stream.readline, b""):
        out.buffer.write(prefix.encode() + line)
        out.flush()
    stream.close()


def launch(argv: list[str], nproc: int, master_port: int | None = None, grace: float = 30.0, prefix: bool = True) -> int:
    """Runs ``argv`` (a Python script and its arguments, or ``-m module ...``) as ``nproc``
    ranks; returns the exit code."""
    port = master_port or free_port()
    procs = []
    pumps = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        p = subprocess.Popen(
            [sys.executable, *argv],
            env=env,
            stdout=subprocess.PIPE if prefix else None,
            stderr=subprocess.STDOUT if prefix else None,
        )
        procs.append(p)
        if prefix:
            t = threading.Thread(target=_pump, args=(f"[{rank}] ", p.stdout, sys.stdout), daemon=True)
            t.start()
            pumps.append(t)
    first_failure: int | None = None
    failed_at: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            for p in procs:
                code = p.poll()
                if code not in (None, 0) and first_failure is None:
                    first_failure, failed_at = code, time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        return 130
    for t in pumps:
        t.join(5)
    if first_failure is None:
        first_failure = next((p.returncode for p in procs if p.returncode != 0), 0)
    return first_failure


def main(args: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parasync.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--nproc", type=int, required=True, help="number of ranks")
    ap.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds the others get after a rank fails")
    ap.add_argument("--no-prefix", action="store_true", help="do not prefix output lines with the rank")
    ap.add_argument("program", nargs=argparse.REMAINDER, help="script.py [args] or -m module [args]")
    ns = ap.parse_args(args)
    if not ns.program:
        ap.error("give the program to run")
    if ns.nproc < 1:
        ap.error("--nproc must be at least 1")
    return launch(ns.program, ns.nproc, ns.master_port, ns.grace, not ns.no_prefix)


if __name__ == "__main__":
    sys.exit(main())
