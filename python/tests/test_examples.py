"""The examples in examples/ run end to end, as real processes, and learn the digits.

numpy_ps.py needs the `parasync` server program: $PARASYNC_BIN or `parasync` on PATH;
without it these tests fail with LocalCluster's FileNotFoundError (they do not skip).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import run_bounded
from parasync.cluster import LocalCluster, find_server_binary

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
TIMEOUT = 180  # seconds per example run; each takes a few seconds on two cores


def run_json(cmd: list[str], prefix: str = "") -> dict:
    """Runs ``cmd`` (in its own process group, killed whole on timeout) and returns the
    JSON object of its last output line that starts with ``prefix + "{"``."""
    p = run_bounded(cmd, TIMEOUT)
    out, err = p.stdout, p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} exited with {p.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    lines = [ln[len(prefix) :] for ln in out.splitlines() if ln.startswith(prefix + "{")]
    assert lines, f"no JSON line in the output of {' '.join(cmd)}\nstdout:\n{out}\nstderr:\n{err}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("mode, floor", [("sync", 0.95), ("async", 0.94), ("bounded", 0.94)])
def test_numpy_ps_trains_through_its_own_cluster(mode: str, floor: float) -> None:
    find_server_binary()  # FileNotFoundError here, in the test, rather than in the child
    r = run_json([sys.executable, str(EXAMPLES / "numpy_ps.py"), "--mode", mode, "--json"])
    assert (r["mode"], r["workers"], r["shards"]) == (mode, 4, 2)
    assert r["steps"] > 0 and r["steps_per_s"] > 0 and r["seconds"] > 0
    assert r["accuracy"] >= floor, f"{mode}: held-out accuracy {r['accuracy']:.4f} < {floor}: {r}"
    if mode == "sync":
        assert r["dropped_stale"] == 0


def test_numpy_ps_uses_an_existing_cluster() -> None:
    with LocalCluster(shards=2, mode="sync", num_workers=2) as cluster:
        r = run_json(
            [sys.executable, str(EXAMPLES / "numpy_ps.py"), "--addresses", ",".join(cluster.addresses), "--workers", "2", "--json"]
        )
        # The example's workers and its final pull went to these shards.
        assert cluster.metric("parasync_bytes_in_total") > 0
    assert (r["mode"], r["workers"], r["shards"]) == ("sync", 2, 2)
    assert r["accuracy"] >= 0.95, r


def test_numpy_allreduce_under_the_launcher() -> None:
    r = run_json(
        [sys.executable, "-m", "parasync.launch", "-n", "4", str(EXAMPLES / "numpy_allreduce.py"), "--json"],
        prefix="[0] ",  # the launcher prefixes each line with its rank; only rank 0 reports
    )
    assert (r["mode"], r["workers"]) == ("allreduce", 4)
    assert r["steps"] > 0 and r["steps_per_s"] > 0
    assert r["accuracy"] >= 0.95, f"held-out accuracy {r['accuracy']:.4f} < 0.95: {r}"
