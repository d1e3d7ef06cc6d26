"""Fixtures: real `parasync server` processes on 127.0.0.1 (ephemeral ports) and helpers to
run Python worker processes with bounded waits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parasync.cluster import LocalCluster, find_server_binary

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "workers"
REPO = HERE.parent.parent


def _server_binary() -> str:
    """$PARASYNC_BIN, else `parasync` on PATH, else the repository's own build."""
    for build in ("release", "debug"):
        candidate = REPO / "target" / build / "parasync"
        if not os.environ.get("PARASYNC_BIN") and candidate.is_file():
            os.environ["PARASYNC_BIN"] = str(candidate)
            break
    return find_server_binary()


@pytest.fixture(scope="session")
def server_bin() -> str:
    return _server_binary()


@pytest.fixture
def cluster(server_bin):
    """Factory: cluster(shards, mode, num_workers, *args) → a LocalCluster, killed after the test."""
    made: list[LocalCluster] = []

    def make(shards: int = 1, mode: str = "sync", num_workers: int = 1, args=()) -> LocalCluster:
        c = LocalCluster(shards, mode, num_workers, list(args), binary=server_bin)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def run_workers(script: str, configs: list[dict], timeout: float = 120.0, env: dict | None = None) -> list[dict]:
    """Runs `workers/<script>` once per config (passed as JSON in argv), all at once; each
    prints one JSON line last. Kills everything past `timeout`; returns the parsed lines."""
    procs = []
    full_env = dict(os.environ, **(env or {}))
    for cfg in configs:
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKERS / script), json.dumps(cfg)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=full_env,
            )
        )
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for code, out, err in outs:
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines, f"worker printed no result (exit {code}):\nstdout:\n{out}\nstderr:\n{err}"
        results.append(json.loads(lines[-1]))
    return results


def run_bounded(
    cmd: list[str], timeout: float, merge_stderr: bool = False, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Runs `cmd` in its own session (with `env` instead of this process's environment, if
    given); past `timeout` the whole session (a launcher and its ranks too) is killed and
    the test fails with the output."""
    return run_bounded_all([cmd], timeout, merge_stderr, [env])[0]


def run_bounded_all(
    cmds: list[list[str]], timeout: float, merge_stderr: bool = False, envs: list[dict | None] | None = None
) -> list[subprocess.CompletedProcess]:
    """`run_bounded` for several commands started at once (the ranks of a job), under one
    deadline: past it every one of them, with its children, is killed and the test fails."""
    procs = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )
        for cmd, env in zip(cmds, envs or [None] * len(cmds))
    ]
    deadline = time.monotonic() + timeout
    done = []
    try:
        for cmd, p in zip(cmds, procs):
            try:
                out, err = p.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
                pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s\nstdout:\n{out[-5000:]}\nstderr:\n{(err or '')[-5000:]}")
            done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return done
