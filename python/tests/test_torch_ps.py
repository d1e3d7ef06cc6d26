"""parasync.torch.ParameterServerOptimizer against real `parasync server` shards: sync mode
equals single-process training, the chief's initial values win, async mode applies every
gradient exactly, wrong inputs fail clearly and leave the servers as they were; and the
PyTorch examples train the digits to their accuracy floors."""

from __future__ import annotations

import json
import os
import socket
import sys

try:
    import torch
except ImportError as e:  # never skipped silently: the torch tests need torch
    raise ImportError("the torch tests need PyTorch: pip install -r python/requirements-torch.txt") from e

import numpy as np
import pytest

import parasync
import parasync.torch as pst
from conftest import WORKERS, run_bounded, run_bounded_all, run_workers
from parasync.cluster import find_server_binary

sys.path.insert(0, str(WORKERS))
import torch_common as tc  # noqa: E402
from torch_common import assert_close, assert_identical  # noqa: E402

EXAMPLES = WORKERS.parent.parent.parent / "examples"
TIMEOUT = 240  # seconds: the bound on every job


def run_ps_workers(cfgs: list[dict]) -> list[dict]:
    for r in run_workers("torch_ps_worker.py", cfgs, timeout=TIMEOUT):
        assert r["ok"], r
    return [torch.load(c["out"], weights_only=False) for c in cfgs]


def reference_sync(cfg: dict, n: int) -> dict[str, torch.Tensor]:
    """One process, momentum SGD on the concatenated batches, the same learning-rate change."""
    torch.set_num_threads(1)
    model = tc.make_model(cfg["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    for step in range(cfg["steps"]):
        if step == cfg["lr_step"]:
            opt.param_groups[0]["lr"] = cfg["lr2"]
        x, y = tc.batch(cfg["seed"], step, cfg["batch"] * n)
        opt.zero_grad()
        tc.loss_fn(model(x), y).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("n", [2, 4])
def test_sync_mode_equals_single_process_training_and_the_chiefs_values_win(cluster, tmp_path, n):
    c = cluster(shards=2, mode="sync", num_workers=n)
    cfg = dict(scenario="sync", addresses=c.addresses, workers=n, seed=5, lr=0.1, lr2=0.05, lr_step=12, batch=8, steps=20)
    got = run_ps_workers([dict(cfg, worker=w, out=str(tmp_path / f"w{w}.pt")) for w in range(n)])
    chief_initial = tc.make_model(cfg["seed"]).state_dict()
    for w, g in enumerate(got):
        assert (g["mode"], g["step"]) == ("sync", cfg["steps"]), g
        assert g["accepted"] > 0
        assert_identical(g["initial"], chief_initial, f"worker {w}'s initial values vs worker 0's")
        assert_identical(g["final"], got[0]["final"], f"worker {w} vs worker 0")
    assert_close(got[0]["final"], reference_sync(cfg, n), 1e-6, f"sync, {n} workers, vs one process")


def test_async_mode_applies_every_gradient_exactly(cluster, tmp_path):
    n, steps = 3, 30
    c = cluster(shards=2, mode="async", num_workers=n)
    cfg = dict(scenario="async", addresses=c.addresses, workers=n, steps=steps)
    got = run_ps_workers([dict(cfg, worker=w, out=str(tmp_path / f"w{w}.pt")) for w in range(n)])
    for g in got:
        assert g["mode"] == "async" and g["pushes"] == 3 * steps, g
    # lr = 1 and integer gradients: final = initial - Σ gradients, exactly.
    with parasync.PsClient(c.addresses, worker_id=0) as client:
        shapes = (("w", (4, 3)), ("b", (3,)), ("unused", (2,)))
        client.register([parasync.VariableSpec(name, shape, parasync.SGD(1.0), init=parasync.Adopt()) for name, shape in shapes])
        final = client.pull(0)
    want_w = np.arange(12.0).reshape(4, 3) * 100 - steps * sum(w + 1 for w in range(n))
    want_b = 7.0 - steps * sum(np.arange(3.0) - w for w in range(n))
    np.testing.assert_array_equal(final["w"], want_w.astype(np.float32))
    np.testing.assert_array_equal(final["b"], want_b.astype(np.float32))
    np.testing.assert_array_equal(final["unused"], np.full(2, -1.0, np.float32))  # zeros pushed


def test_a_worker_joining_later_starts_from_the_servers_values(cluster):
    c = cluster(shards=1, mode="async", num_workers=2)
    first = torch.nn.Linear(3, 2)
    with parasync.PsClient(c.addresses, worker_id=0) as a:
        opt = pst.ParameterServerOptimizer(first, a, parasync.SGD(0.5))
        first(torch.ones(1, 3)).sum().backward()
        opt.step()
        late = torch.nn.Linear(3, 2)  # its own random values; as worker 0 it would register them
        with parasync.PsClient(c.addresses, worker_id=1) as b:
            pst.ParameterServerOptimizer(late, b, parasync.SGD(0.5))
        assert_identical(late.state_dict(), first.state_dict(), "late worker vs trained worker")


def test_wrong_inputs_raise_clear_errors_and_leave_the_servers_as_they_were(cluster):
    c = cluster(shards=1, mode="async", num_workers=1)
    with parasync.PsClient(c.addresses) as client:
        with pytest.raises(TypeError, match=r"parameter 'weight' is torch.float64: the parameter server takes float32"):
            pst.ParameterServerOptimizer(torch.nn.Linear(2, 2).double(), client)
        with pytest.raises(TypeError, match="client must be a parasync.PsClient"):
            pst.ParameterServerOptimizer(torch.nn.Linear(2, 2), object())
        with pytest.raises(ValueError, match="no trainable parameters"):
            pst.ParameterServerOptimizer(torch.nn.Linear(2, 2).requires_grad_(False), client)
        assert client.shard_info()[0]["variables"] == []  # nothing was registered

        model = torch.nn.Linear(2, 2)
        opt = pst.ParameterServerOptimizer(model, client, parasync.SGD(0.1))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with parasync.PsClient(c.addresses) as other:  # the same names, other shapes
            with pytest.raises(parasync.ParasyncError, match=r"weight"):
                pst.ParameterServerOptimizer(torch.nn.Linear(3, 2), other, parasync.SGD(0.1))
        model.weight.grad = torch.ones(2, 2).t()  # a non-contiguous gradient: refused, not copied
        with pytest.raises(ValueError, match="gradient of 'weight' is not contiguous"):
            opt.step()
        opt.pull()
        assert_identical(model.state_dict(), before, "values after the refused inputs")
        model.weight.grad = torch.ones(2, 2)
        opt.step()  # the client and the servers still work
        assert torch.allclose(model.weight, before["weight"] - 0.1)
        assert sorted(client.shard_info()[0]["variables"]) == [("bias", 1), ("weight", 1)]  # one update: the refused step sent nothing


# -- the examples ---------------------------------------------------------------------------


def run_json(cmd: list[str], prefix: str = "", env: dict | None = None) -> dict:
    p = run_bounded(cmd, TIMEOUT, env=env)
    assert p.returncode == 0, f"{' '.join(cmd)} exited with {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    lines = [ln[len(prefix) :] for ln in p.stdout.splitlines() if ln.startswith(prefix + "{")]
    assert lines, f"no JSON line in the output of {' '.join(cmd)}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("mode, floor", [("sync", 0.95), ("async", 0.94), ("bounded", 0.94)])
def test_torch_ps_digits_trains_through_two_shards_and_four_workers(mode, floor):
    find_server_binary()  # FileNotFoundError here, in the test, rather than in the child
    r = run_json([sys.executable, str(EXAMPLES / "torch_ps_digits.py"), "--mode", mode, "--json"])
    assert (r["mode"], r["workers"], r["shards"]) == (mode, 4, 2)
    assert r["steps_per_s"] > 0
    assert r["accuracy"] >= floor, f"{mode}: held-out accuracy {r['accuracy']:.4f} < {floor}: {r}"
    if mode == "sync":
        assert r["dropped_stale"] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["optimizer", "ddp", "hook"])
def test_torch_ddp_digits_under_the_launcher(how):
    r = run_json(
        [sys.executable, "-m", "parasync.launch", "-n", "4", str(EXAMPLES / "torch_ddp_digits.py"), "--how", how, "--json"],
        prefix="[0] ",
    )
    assert (r["mode"], r["workers"]) == (how, 4)
    assert r["accuracy"] >= 0.95, f"{how}: held-out accuracy {r['accuracy']:.4f} < 0.95: {r}"


def test_torch_ddp_digits_under_srun_with_no_extra_variables():
    """What srun sets for each task, and nothing else: rank, size and the rendezvous come
    from SLURM_PROCID / SLURM_NTASKS, the step's node list and a port from the job id."""
    n = 2
    for _ in range(100):  # a job id whose port (15000 + id mod 20000) is free here
        port = free_port()
        if 15000 <= port < 35000:
            break
    else:
        pytest.fail("no free port in 15000..35000")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_", "TORCHELASTIC", "PARASYNC_MASTER", "TF_CONFIG", "SLURM_"))}
    envs = [
        dict(base, SLURM_PROCID=str(r), SLURM_NTASKS=str(n), SLURM_LOCALID=str(r), SLURM_JOB_ID=str(port - 15000 + 40000),
             SLURM_STEP_NODELIST="127.0.0.1", SLURM_NODELIST="127.0.0.1", SLURM_STEP_ID="0")
        for r in range(n)
    ]
    cmd = [sys.executable, str(EXAMPLES / "torch_ddp_digits.py"), "--json", "--steps", "200"]
    res = run_bounded_all([cmd] * n, TIMEOUT, envs=envs)
    for r, p in enumerate(res):
        assert p.returncode == 0, f"task {r} exited with {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    report = json.loads([ln for ln in res[0].stdout.splitlines() if ln.startswith("{")][-1])
    assert (report["mode"], report["workers"]) == ("optimizer", n)
    assert report["accuracy"] >= 0.9, report
