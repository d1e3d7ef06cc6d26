"""Communicator between real Python processes, and its argument checks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import parasync
from conftest import WORKERS, run_workers


DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64, "bfloat16": ml_dtypes.bfloat16}
SIZES = [1000, 70000]  # direct algorithm, and the ring (280 KB of f32 per rank)


def inputs(rank: int, dtype: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * rank + len(dtype) + n)
    if dtype.startswith("int"):
        return rng.integers(-1000, 1000, n).astype(DTYPES[dtype])
    return rng.standard_normal(n).astype(DTYPES[dtype])


def free_master() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def run_job(size: int, tmp_path, tag: str) -> list[dict]:
    master = free_master()
    configs = [dict(rank=r, size=size, master=master, sizes=SIZES, out=str(tmp_path / f"{tag}-{r}.npz")) for r in range(size)]
    assert all(r["ok"] for r in run_workers("collective_rank.py", configs, timeout=240))
    return [dict(np.load(tmp_path / f"{tag}-{r}.npz")) for r in range(size)]


def as_dtype(v: np.ndarray, dt: str) -> np.ndarray:
    return v.view(ml_dtypes.bfloat16) if dt == "bfloat16" else v


def reference(op: str, xs: list[np.ndarray], dt: str) -> np.ndarray:
    wide = np.stack([x.astype(np.float64) if not dt.startswith("int") else x.astype(np.int64) for x in xs])
    if op == "sum":
        r = wide.sum(0)
    elif op == "avg":
        r = np.trunc(wide.sum(0) / len(xs)) if dt.startswith("int") else wide.sum(0) / len(xs)
    elif op == "min":
        r = wide.min(0)
    else:
        r = wide.max(0)
    return r.astype(DTYPES[dt])


def assert_matches(got: np.ndarray, want: np.ndarray, dt: str, exact: bool, what: str) -> None:
    if dt.startswith("int") or exact:
        assert got.tobytes() == want.tobytes(), what
        return
    rtol = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 1e-2}[dt]
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=rtol, err_msg=what)


@pytest.mark.parametrize("size", [2, 4])
def test_every_op_and_dtype_equals_numpy_and_floats_repeat_bitwise(size, tmp_path):
    first = run_job(size, tmp_path, "a")
    second = run_job(size, tmp_path, "b")
    for r in range(size):
        assert first[r].keys() == second[r].keys()
        for k in first[r]:
            assert first[r][k].tobytes() == second[r][k].tobytes(), f"rank {r} {k}: differs between two runs"
    for n in SIZES:
        for dt in DTYPES:
            xs = [inputs(r, dt, n) for r in range(size)]
            for r in range(size):
                res = {k: as_dtype(v, dt) for k, v in first[r].items() if f"-{dt}-{n}" in k}
                for op in ("sum", "avg", "min", "max"):
                    exact = op in ("min", "max")
                    assert_matches(res[f"allreduce-{op}-{dt}-{n}"], reference(op, xs, dt), dt, exact, f"allreduce {op} {dt} {n} rank {r}")
                assert res[f"allreduce_async-sum-{dt}-{n}"].tobytes() == res[f"allreduce-sum-{dt}-{n}"].tobytes()
                assert res[f"broadcast-{dt}-{n}"].tobytes() == xs[size - 1].tobytes()
                assert res[f"allgather-{dt}-{n}"].tobytes() == np.concatenate(xs).tobytes()
                assert res[f"allgather_async-{dt}-{n}"].tobytes() == np.concatenate(xs).tobytes()
                block = reference("sum", xs, dt)  # every rank sends its x as each block
                assert_matches(res[f"reduce_scatter-sum-{dt}-{n}"], block, dt, False, f"reduce_scatter {dt} {n} rank {r}")
            # Every rank holds the same reduction, bit for bit.
            for op in ("sum", "avg"):
                key = f"allreduce-{op}-{dt}-{n}"
                assert all(first[r][key].tobytes() == first[0][key].tobytes() for r in range(size)), key


def test_a_killed_rank_is_named_by_every_other_rank_within_the_timeout(tmp_path):
    killed_rank_is_named(None)


def test_a_killed_rank_is_named_over_tls_too(server_bin, tmp_path):
    certs = tmp_path / "certs"
    subprocess.run([server_bin, "tls-certs", "--out", str(certs)], check=True, capture_output=True, timeout=60)
    env = dict(os.environ, PARASYNC_COLLECTIVE_TLS="1", PARASYNC_TLS_CERT=str(certs / "server.pem"),
               PARASYNC_TLS_KEY=str(certs / "server-key.pem"), PARASYNC_TLS_CA=str(certs / "ca.pem"))
    killed_rank_is_named(env)


def killed_rank_is_named(env: dict | None) -> None:
    size, victim, timeout = 4, 2, 10
    master = free_master()
    configs = [dict(rank=r, size=size, master=master, kill_rank=victim, timeout=timeout) for r in range(size)]
    procs = [
        subprocess.Popen([sys.executable, str(WORKERS / "collective_rank.py"), json.dumps(c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for c in configs
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout + 60))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[victim].returncode == -9
    for r, (out, err) in enumerate(outs):
        if r == victim:
            continue
        line = json.loads(out.strip().splitlines()[-1])
        assert line["error"] in ("PeerError", "PeerTimeoutError"), (r, line, err)
        assert line["rank"] == victim, (r, line)
        assert f"rank {victim}" in line["message"], line
        assert line["elapsed"] < timeout + 2, line


@pytest.fixture
def solo():
    c = parasync.Communicator(0, 1, free_master(), timeout=10)
    yield c
    c.close()


def test_a_single_rank_runs_every_op_in_place(solo):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert solo.allreduce(a, "avg") is a
    assert np.array_equal(a, np.arange(6, dtype=np.float32).reshape(2, 3))
    recv = np.zeros(6, np.int64)
    solo.allgather(np.arange(6, dtype=np.int64), recv)
    assert np.array_equal(recv, np.arange(6))
    w = solo.allreduce_async(np.ones(3, ml_dtypes.bfloat16))
    assert w.wait(timeout=10).dtype == ml_dtypes.bfloat16 and w.done()
    solo.barrier()
    assert (solo.rank, solo.size, solo.pending) == (0, 1, 0)


BAD = [
    ("list", lambda c: c.allreduce([1.0, 2.0]), TypeError, "allreduce: array: expected a numpy.ndarray, got a list"),
    ("float16", lambda c: c.allreduce(np.ones(4, np.float16)), TypeError, "dtype float16 is not supported"),
    ("non-contiguous", lambda c: c.allreduce(np.ones((4, 4), np.float32)[:, 1]), ValueError, "not C-contiguous"),
    ("read-only", lambda c: c.allreduce(np.frombuffer(b"\0" * 16, np.float32)), ValueError, "read-only"),
    ("unknown op", lambda c: c.allreduce(np.ones(4, np.float32), "prod"), ValueError, 'unknown reduce op "prod"'),
    ("root", lambda c: c.broadcast(np.ones(4, np.float32), 3), ValueError, "root 3 is not a rank of 1"),
    ("mixed dtypes", lambda c: c.allgather(np.ones(4, np.float32), np.ones(4, np.float64)), ValueError, "send is f32, recv is f64"),
    ("sizes", lambda c: c.reduce_scatter(np.ones(4, np.float32), np.ones(3, np.float32)), ValueError, "sizes must satisfy"),
    ("overlap", lambda c: (lambda b: c.allgather(b[:4], b[2:6]))(np.ones(8, np.float32)), ValueError, "overlap"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_before_anything_moves(solo, case):
    _, call, exc, message = case
    with pytest.raises(exc) as info:
        call(solo)
    assert message in str(info.value)
    # Nothing was started: the communicator still works.
    assert solo.allreduce(np.ones(2, np.float32))[0] == 1.0


def test_rendezvous_and_environment_errors_have_their_classes():
    with pytest.raises(parasync.RendezvousError) as e:
        parasync.Communicator(1, 2, free_master(), timeout=0.5)
    assert isinstance(e.value, ConnectionError)
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        parasync.Communicator(2, 2, free_master(), timeout=1)


def test_init_without_launcher_variables_says_what_is_missing(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TF_CONFIG", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(parasync.LaunchEnvironmentError, match="no launcher variables"):
        parasync.init(timeout=1)
