"""PsClient against real `parasync server` processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import parasync
from conftest import run_workers


def test_sync_four_worker_processes_equal_a_numpy_reference_bit_for_bit(cluster, tmp_path):
    workers, steps, lr = 4, 5, np.float32(0.1)
    cl = cluster(shards=2, mode="sync", num_workers=workers)
    rng = np.random.default_rng(7)
    # "big" is split over both shards (split_bytes below), the others are whole.
    init = {
        "big": rng.standard_normal((64, 33)).astype(np.float32),
        "w": rng.standard_normal((5, 7)).astype(np.float32),
        "b": rng.standard_normal(11).astype(np.float32),
    }
    np.savez(tmp_path / "init.npz", **init)
    names = list(init)
    configs = [
        dict(worker=w, addresses=cl.addresses, steps=steps, lr=float(lr), names=names, split_bytes=4096,
             init=str(tmp_path / "init.npz"), out=str(tmp_path / f"w{w}.npz"))
        for w in range(workers)
    ]
    results = run_workers("ps_sync_worker.py", configs)
    assert all(r["ok"] for r in results)

    ref = {n: v.copy() for n, v in init.items()}
    for step in range(steps):
        for n in names:
            grads = [np.sin(ref[n] * np.float32(w + 1) + np.float32(step)).astype(np.float32) for w in range(workers)]
            total = grads[0].copy()
            for g in grads[1:]:
                total = total + g  # worker order, f32
            mean = total / np.float32(workers)
            ref[n] = ref[n] - lr * mean
    for w in range(workers):
        got = np.load(tmp_path / f"w{w}.npz")
        for n in names:
            assert got[n].tobytes() == ref[n].tobytes(), f"worker {w}, variable {n}: differs from the reference"


def test_async_eight_threads_apply_every_integer_gradient_exactly(cluster):
    cl = cluster(shards=2, mode="async", num_workers=8)
    shape = (40, 50)
    init = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    pushes = 25

    def grad(t: int, i: int) -> np.ndarray:
        return np.full(shape, (t * 31 + i) % 7 - 3, dtype=np.float32)

    errors = []

    def worker(t: int) -> None:
        try:
            with parasync.PsClient(cl.addresses, worker_id=t, split_bytes=2048) as c:
                c.register([parasync.VariableSpec("w", shape, parasync.SGD(1.0), init=init),
                            parasync.VariableSpec("v", (3,), parasync.SGD(1.0))])
                for i in range(pushes):
                    c.push(i, {"w": grad(t, i), "v": np.ones(3, np.float32)})
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads)
    with parasync.PsClient(cl.addresses, worker_id=0, split_bytes=2048) as c:
        c.register([parasync.VariableSpec("w", shape, parasync.SGD(1.0), init=init),
                    parasync.VariableSpec("v", (3,), parasync.SGD(1.0))])
        final = c.pull(0)
    expected = init - sum(grad(t, i) for t in range(8) for i in range(pushes))
    assert np.array_equal(final["w"], expected)
    assert np.array_equal(final["v"], np.full(3, -8.0 * pushes, np.float32))


def test_a_pull_waiting_for_a_step_does_not_hold_up_a_push_from_another_thread(cluster):
    cl = cluster(shards=1, mode="sync", num_workers=2)
    spec = [parasync.VariableSpec("w", (4,), parasync.SGD(1.0), init=np.zeros(4, np.float32))]
    c0 = parasync.PsClient(cl.addresses, worker_id=0, pull_timeout=30)
    c1 = parasync.PsClient(cl.addresses, worker_id=1, pull_timeout=30)
    c0.register(spec)
    c1.register(spec)
    c0.push(0, [np.ones(4, np.float32)])
    got = {}

    def waiting_pull() -> None:
        got["values"] = c0.pull(1)  # waits for worker 1's gradient
        got["at"] = time.monotonic()

    th = threading.Thread(target=waiting_pull)
    th.start()
    time.sleep(0.3)
    assert th.is_alive(), "the pull for step 1 should still be waiting"
    pushed_at = time.monotonic()
    c1.push(0, [np.full(4, 3.0, np.float32)])  # runs while the other thread waits
    th.join(10)
    assert not th.is_alive(), "the waiting pull did not return after the step completed"
    assert np.array_equal(got["values"]["w"], np.full(4, -2.0, np.float32))
    assert got["at"] - pushed_at < 5
    c0.close()
    c1.close()


BAD_INPUTS = [
    ("float64 gradient", lambda g: g.update(w=g["w"].astype(np.float64)), TypeError, 'variable "w": expected a numpy.ndarray of float32'),
    ("a list", lambda g: g.update(w=g["w"].tolist()), TypeError, 'variable "w": expected a numpy.ndarray of float32, got a list'),
    ("wrong shape", lambda g: g.update(w=g["w"].reshape(6, 4)), ValueError, 'variable "w" has shape [4, 6]'),
    ("non-contiguous", lambda g: g.update(w=np.ones((6, 4), np.float32).T), ValueError, "not C-contiguous"),
    ("missing variable", lambda g: g.pop("b"), ValueError, "1 arrays given for 2 registered variables"),
    ("unknown name", lambda g: (g.pop("b"), g.update(c=np.ones(3, np.float32))), ValueError, 'no array for variable "b"'),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_arguments_raise_the_named_exception_and_send_nothing(cluster, case):
    _, mutate, exc, message = case
    cl = cluster(shards=1, mode="async")
    with parasync.PsClient(cl.addresses) as c:
        c.register([parasync.VariableSpec("w", (4, 6)), parasync.VariableSpec("b", (3,))])
        before = cl.metrics(0)
        grads = {"w": np.ones((4, 6), np.float32), "b": np.ones(3, np.float32)}
        mutate(grads)
        with pytest.raises(exc, match=None) as info:
            c.push(0, grads)
        assert message in str(info.value)
        out = c.empty()
        mutate(out)
        with pytest.raises(exc) as info:
            c.pull_into(0, out)
        assert message in str(info.value)
        with pytest.raises(exc):
            c.push_pull(0, grads, c.empty())
        after = cl.metrics(0)
        for counter in ("parasync_pushes_total", "parasync_pulls_total", "parasync_bytes_in_total", "parasync_bytes_out_total"):
            assert after.get(counter, 0) == before.get(counter, 0), counter
        # The server still serves, its state intact.
        assert np.array_equal(c.pull(0)["w"], np.zeros((4, 6), np.float32))


def test_read_only_output_and_caller_mistakes_are_refused_before_sending(cluster):
    cl = cluster(shards=1, mode="async")
    with parasync.PsClient(cl.addresses) as c:
        with pytest.raises(ValueError, match="register the model"):
            c.pull(0)
        c.register([parasync.VariableSpec("w", (2, 2))])
        out = c.empty()
        out["w"].flags.writeable = False
        with pytest.raises(ValueError, match='variable "w": the output array is read-only'):
            c.pull_into(0, out)
        g = np.ones((2, 2), np.float32)
        with pytest.raises(ValueError, match="already in use"):
            c.push_pull(0, [g], [g])
    with pytest.raises(ValueError, match='wire_dtype must be "f32" or "bf16"'):
        parasync.PsClient(cl.addresses, wire_dtype="f16")
    with pytest.raises(ValueError, match="initial values have shape"):
        parasync.PsClient(cl.addresses).register([parasync.VariableSpec("x", (3,), init=np.ones(4))])
    closed = parasync.PsClient(cl.addresses)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        closed.pull(0)


def test_server_errors_map_to_their_exception_classes(cluster):
    cl = cluster(shards=1, mode="sync", num_workers=2)
    with parasync.PsClient(cl.addresses, pull_timeout=0.3) as c:
        c.register([parasync.VariableSpec("w", (3,), parasync.SGD(0.1))])
        with pytest.raises(parasync.PsTimeoutError) as t:
            c.pull(1)
        assert isinstance(t.value, TimeoutError) and isinstance(t.value, parasync.ParasyncError)
        assert "waiting for gradients from worker(s) [0, 1]" in str(t.value)
        with pytest.raises(parasync.PsInvalidArgumentError) as nf:
            c.push(0, [np.array([1, np.nan, 2], np.float32)])
        assert "w" in str(nf.value)
        with pytest.raises(parasync.PsAlreadyExistsError):
            c.register([parasync.VariableSpec("w", (3,), parasync.SGD(0.5))])
    with pytest.raises(parasync.PsUnavailableError) as u:
        parasync.PsClient(["127.0.0.1:1"], timeout=0.5)
    assert isinstance(u.value, ConnectionError)


def test_bf16_wire_and_storage_and_shard_info(cluster):
    cl = cluster(shards=2, mode="async")
    with parasync.PsClient(cl.addresses, wire_dtype="bf16", pull_wire_dtype="f32") as c:
        c.register([parasync.VariableSpec("w", (8,), parasync.SGD(1.0), init=parasync.Constant(1.0), dtype="bf16"),
                    parasync.VariableSpec("a", (2, 3), parasync.Adam(0.01), init=parasync.Uniform(-1, 1, seed=3))])
        s = c.push(0, [np.full(8, 0.5, np.float32), np.ones((2, 3), np.float32)])
        assert s.accepted == 2 and s.dropped_stale == 0
        assert np.array_equal(c.pull(1)["w"], np.full(8, 0.5, np.float32))
        info = c.shard_info()
        assert [i["mode"] for i in info] == ["async", "async"]
        assert sorted(n for i in info for n, _ in i["variables"]) == ["a", "w"]
        c.set_learning_rate(0.0)
        before = c.pull(1)["w"]
        c.push(1, [np.full(8, 0.5, np.float32), np.ones((2, 3), np.float32)])
        assert np.array_equal(c.pull(2)["w"], before)


def test_addresses_default_to_tf_config(cluster, monkeypatch):
    cl = cluster(shards=2, mode="async")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"ps": %s}, "task": {"type": "worker", "index": 0}}' % str(cl.addresses).replace("'", '"'))
    with parasync.PsClient() as c:
        assert c.num_shards == 2
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        parasync.PsClient()


def test_ctrl_c_interrupts_a_blocked_pull_within_a_second(cluster):
    cl = cluster(shards=1, mode="sync", num_workers=2)
    code = (
        "import sys, parasync\n"
        f"c = parasync.PsClient({cl.addresses!r}, pull_timeout=60)\n"
        "c.register([parasync.VariableSpec('w', (4,))])\n"
        "print('blocking', flush=True)\n"
        "try:\n"
        "    c.pull(3)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(0)\n"
        "print('returned', flush=True)\n"
        "sys.exit(1)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "blocking"
        time.sleep(0.5)  # well inside the pull
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        line = p.stdout.readline().strip()
        elapsed = time.monotonic() - sent
        assert line == "interrupted", (line, p.stderr.read())
        assert elapsed < 1.0, f"KeyboardInterrupt came {elapsed:.2f} s after SIGINT"
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
