"""Local parameter-server shards as child processes, for examples, tests and single-host
jobs: ``parasync server`` on 127.0.0.1 with ephemeral ports.

The ``parasync`` program comes from ``binary=``, else ``$PARASYNC_BIN``, else ``PATH``
(``cargo install --path .`` from the repository puts it there).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from typing import Sequence


def find_server_binary(binary: str | None = None) -> str:
    """The ``parasync`` program to start shards with."""
    candidates = [binary, os.environ.get("PARASYNC_BIN"), shutil.which("parasync")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        "cannot find the `parasync` program: pass binary=, set PARASYNC_BIN, or put it on PATH "
        "(cargo install --path . from the repository, or cargo build --release → target/release/parasync)"
    )


class LocalCluster:
    """``shards`` parameter-server processes on 127.0.0.1; killed on ``close()`` / exit.

    Args:
        shards: number of shards.
        mode: ``"sync"``, ``"async"`` or ``"bounded"``.
        num_workers: workers the shards expect.
        args: more ``parasync server`` flags (``["--max-staleness", "2"]``).
        binary: the ``parasync`` program (see the module documentation).
        ready_timeout: seconds each shard may take to announce its address.
    """

    def __init__(
        self,
        shards: int = 1,
        mode: str = "sync",
        num_workers: int = 1,
        args: Sequence[str] = (),
        binary: str | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self._exe = find_server_binary(binary)
        self._base = ["--mode", mode, "--num-workers", str(num_workers), *args]
        self._ready_timeout = ready_timeout
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        self.metrics_addresses: list[str] = []
        try:
            for i in range(shards):
                p, addr, metrics = self._launch(i, "127.0.0.1:0", "127.0.0.1:0", ())
                self.procs.append(p)
                self.addresses.append(addr)
                self.metrics_addresses.append(metrics)
        except BaseException:
            self.close()
            raise

    def _launch(self, shard: int, listen: str, metrics: str, extra: Sequence[str]) -> tuple[subprocess.Popen, str, str]:
        cmd = [self._exe, "server", "--listen", listen, "--metrics-listen", metrics, "--shard-index", str(shard),
               *self._base, *extra]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        env.pop("TF_CONFIG", None)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, env=env, text=True)
        try:
            addr, metrics_addr = self._announcement(p, self._ready_timeout)
        except BaseException:
            p.kill()
            p.wait()
            raise
        return p, addr, metrics_addr

    def kill(self, shard: int) -> None:
        """SIGKILLs one shard (as a machine dying would) and waits for it."""
        p = self.procs[shard]
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdout:
            p.stdout.close()

    def restart(self, shard: int, args: Sequence[str] = ()) -> None:
        """Starts a killed (or exited) shard again on the same addresses, with ``args`` added
        (``["--restore", "latest"]``); clients connected to the job find it there."""
        if self.procs[shard].poll() is None:
            raise RuntimeError(f"shard {shard} is still running: kill it first")
        p, _, _ = self._launch(shard, self.addresses[shard], self.metrics_addresses[shard], args)
        self.procs[shard] = p

    @staticmethod
    def _announcement(p: subprocess.Popen, timeout: float) -> tuple[str, str]:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(p.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0]:
            p.kill()
            raise RuntimeError(f"parasync server did not announce its address within {timeout} s (exit code {p.poll()})")
        # "ps-server listening on ADDR metrics ADDR"
        words = line[0].split()
        if len(words) < 6 or words[1] != "listening":
            p.kill()
            raise RuntimeError(f"unexpected first line from parasync server: {line[0]!r}")
        return words[3], words[5]

    def metrics(self, shard: int) -> dict[str, float]:
        """The shard's Prometheus metrics, summed over label sets: name → value."""
        with urllib.request.urlopen(f"http://{self.metrics_addresses[shard]}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for ln in text.splitlines():
            if not ln or ln.startswith("#"):
                continue
            name_labels, _, value = ln.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return out

    def metric(self, name: str) -> float:
        """``name`` summed over every shard."""
        return sum(self.metrics(i).get(name, 0.0) for i in range(len(self.procs)))

    def terminate(self, timeout: float = 10.0) -> list[int | None]:
        """SIGTERM every shard and wait for it; returns the exit codes."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes

    def close(self) -> None:
        """Kills every shard. Idempotent."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            if p.stdout:
                p.stdout.close()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
