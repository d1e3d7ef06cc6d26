"""parasync.torch between real processes (`python -m parasync.launch`, torchrun): the
DistributedOptimizer and the DDP hook against single-process training and DDP over Gloo,
parameter and optimizer-state broadcasts, a killed rank, wrong inputs. Every wait is
bounded; results come back through files in tmp_path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

try:
    import torch
except ImportError as e:  # never skipped silently: the torch tests need torch
    raise ImportError(
        "the torch tests need PyTorch: pip install -r python/requirements-torch.txt "
        f"(python/requirements-test.txt as well) ({e})"
    ) from e

import numpy as np
import pytest

import parasync
import parasync.torch as pst
from conftest import WORKERS, run_bounded

sys.path.insert(0, str(WORKERS))
import torch_common as tc  # noqa: E402
from torch_common import assert_close, assert_identical  # noqa: E402

WORKER = str(WORKERS / "torch_rank.py")
WAIT = 180  # seconds: the bound on every job


def run_job(argv: list[str], timeout: float = WAIT) -> subprocess.CompletedProcess:
    """Runs a launcher command in its own session; past `timeout` the whole session (the
    launcher and its ranks) is killed and the test fails."""
    return run_bounded(argv, timeout, merge_stderr=True)


def launch(n: int, cfg: dict, grace: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
    res = run_job([sys.executable, "-m", "parasync.launch", "-n", str(n), "--grace", str(grace), WORKER, json.dumps(cfg)])
    if check:
        assert res.returncode == 0, f"job failed (exit {res.returncode}):\n{res.stdout[-8000:]}"
    return res


def two_free_ports() -> int:
    """A port p with p and p + 1 free (torchrun's store, and Parasync's rendezvous next to it)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free ports")


def load_ranks(directory, name: str, n: int) -> list:
    return [torch.load(directory / f"{name}-{r}.pt", weights_only=False) for r in range(n)]


# -- DistributedOptimizer ---------------------------------------------------------------

BASE = dict(seed=3, lr=0.1, batch=8, steps=20)
VARIANTS = {
    "buckets": dict(BASE, bucket_bytes=1024),  # several buckets, started during backward
    "one_bucket": dict(BASE),  # 25 MiB: one bucket, started in step()
    "unused_params": dict(BASE, extra=True, bucket_bytes=1024),  # a layer only some ranks use, some steps none
    "accumulate": dict(BASE, k=2),  # backward_passes_per_step=2, loss / 2 per micro-batch
    "bf16": dict(BASE, compression="bf16", bucket_bytes=1024),
}


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def dopt_job(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"dopt{n}")
    variants = [dict(v, name=name) for name, v in VARIANTS.items()]
    launch(n, {"scenario": "dopt", "out": str(out), "variants": variants})
    return n, load_ranks(out, "dopt", n)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "bf16"])
def test_distributed_optimizer_equals_single_process_training_and_ranks_agree_bitwise(dopt_job, variant):
    n, ranks = dopt_job
    want = tc.reference(VARIANTS[variant], n)
    for r in range(n):
        assert_identical(ranks[r][variant], ranks[0][variant], f"rank {r} vs rank 0")
    assert_close(ranks[0][variant], want, 1e-6, f"{variant}, {n} ranks vs one process on the concatenated batches")
    # and training moved the weights far more than the tolerance
    init = tc.make_model(BASE["seed"], VARIANTS[variant].get("extra", False)).state_dict()
    assert min((want[k] - init[k]).abs().max().item() for k in want) > 1e-2


def test_distributed_optimizer_bf16_compression_stays_close_and_ranks_agree(dopt_job):
    n, ranks = dopt_job
    for r in range(n):
        assert_identical(ranks[r]["bf16"], ranks[0]["bf16"], f"rank {r} vs rank 0")
    assert_close(ranks[0]["bf16"], tc.reference(VARIANTS["bf16"], n), 2e-2, f"bf16, {n} ranks")


# -- DDP with the comm hook, under torchrun ---------------------------------------------


DDP_VARIANT = dict(seed=4, lr=0.1, batch=8, steps=20, bucket_cap_mb=0.001)  # several DDP buckets


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory):
    """One torchrun job, 2 ranks (see scenario_ddp in workers/torch_rank.py)."""
    n, port, out = 2, two_free_ports(), tmp_path_factory.mktemp("ddp")
    cfg = {"scenario": "ddp", "out": str(out), "variant": DDP_VARIANT}
    res = run_job([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
                   "--master-port", str(port), WORKER, json.dumps(cfg)])
    assert res.returncode == 0, res.stdout[-8000:]
    return n, load_ranks(out, "ddp", n)


def test_ddp_with_the_parasync_hook_or_backend_equals_ddp_over_gloo_under_torchrun(ddp_job):
    n, ranks = ddp_job
    for name in ("gloo", "hook", "bf16", "backend"):
        for r in range(n):
            assert_identical(ranks[r][name], ranks[0][name], f"{name}: rank {r} vs rank 0")
    assert_close(ranks[0]["hook"], ranks[0]["gloo"], 1e-6, "DDP + allreduce_hook vs DDP over Gloo")
    assert_close(ranks[0]["backend"], ranks[0]["gloo"], 1e-6, 'DDP over the "parasync" backend vs DDP over Gloo')
    assert_close(ranks[0]["hook"], tc.reference(DDP_VARIANT, n), 1e-6, "DDP + allreduce_hook vs one process")
    assert_close(ranks[0]["bf16"], ranks[0]["gloo"], 2e-2, "DDP + bf16_compress_hook vs DDP over Gloo")


def test_the_parasync_torch_distributed_backend_runs_each_collective(ddp_job):
    n, ranks = ddp_job
    for r, got in enumerate(ranks):
        c = got["collectives"]
        assert c["all_reduce_sum"].tolist() == [3.0] * 3
        assert c["all_reduce_max"].tolist() == [2.0] * 3 and c["all_reduce_max"].dtype == torch.float64
        assert c["all_reduce_avg_async"].tolist() == [1.5] * 2 and c["all_reduce_avg_async"].dtype == torch.bfloat16
        assert c["broadcast"].tolist() == [0, 2, 4, 6]
        assert c["broadcast_bool"].tolist() == [True, True, False]
        assert c["all_gather"].tolist() == [[0.0, 0.0], [1.0, 1.0]]
        assert c["all_gather_into_tensor"].tolist() == [0, 0, 1, 1]
        assert c["reduce_scatter"].tolist() == [float(2 * r + 1)] * 2  # sum over ranks q of (r + q)
        assert c["reduce_scatter_tensor"].tolist() == [2.0 * (2 * r) + 1, 2.0 * (2 * r + 1) + 1]
        assert c["send"].startswith("NotImplementedError") and "does not implement send" in c["send"], c["send"]


# -- broadcasts ---------------------------------------------------------------------------


def test_broadcast_parameters_and_optimizer_state_give_every_rank_rank_0s_exactly(tmp_path):
    n = 3  # rank 0: 3 Adam steps, rank 1: none (no state yet), rank 2: 2; each its own lr and betas
    launch(n, {"scenario": "bcast", "out": str(tmp_path)})
    ranks = load_ranks(tmp_path, "bcast", n)
    root = ranks[0]
    assert root["opt"]["param_groups"][0]["lr"] == 0.01 and len(root["opt"]["state"]) == 6
    assert root["opt"]["state"][0]["step"].item() == 3
    assert root["model"]["mask"].all() and root["model"]["h16"].dtype == torch.float16
    for r in range(1, n):
        assert_identical(ranks[r]["model"], root["model"], f"rank {r} model")
        assert_identical(ranks[r]["opt"], root["opt"], f"rank {r} optimizer state")
        # one more (DistributedOptimizer) step from there: still identical everywhere
        assert_identical(ranks[r]["next_model"], root["next_model"], f"rank {r} model after a step")
        assert_identical(ranks[r]["next_opt"], root["next_opt"], f"rank {r} optimizer after a step")
    assert root["next_opt"]["state"][0]["step"].item() == 4


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["dopt", "backend", "hook"])
def test_a_rank_killed_mid_step_is_named_by_the_others_within_the_timeout(tmp_path, via):
    n, victim, timeout = 3, 1, 10
    cfg = {"scenario": "kill", "out": str(tmp_path), "timeout": timeout, "victim": victim, "via": via}
    res = launch(n, cfg, grace=timeout + 60, check=False)
    assert res.returncode != 0, res.stdout[-4000:]
    assert not (tmp_path / f"kill-{victim}.json").exists()
    for r in range(n):
        if r == victim:
            continue
        path = tmp_path / f"kill-{r}.json"
        assert path.exists(), f"rank {r} wrote no result:\n{res.stdout[-8000:]}"
        line = json.loads(path.read_text())
        if via == "dopt":
            assert line["error"] in ("PeerError", "PeerTimeoutError"), line
            assert line["rank"] == victim, line
        else:  # through DDP's C++ reducer: a RuntimeError carrying the parasync error
            assert line["error"] == "RuntimeError" and "PeerError: " in line["message"], line
        assert f"rank {victim}" in line["message"], line
        assert line["elapsed"] < timeout + 2, line


def test_wrong_inputs_raise_clear_errors_and_mismatched_shapes_fail_on_every_rank(tmp_path):
    n, timeout = 2, 10
    launch(n, {"scenario": "bad", "out": str(tmp_path), "timeout": timeout})
    for r in range(n):
        res = json.loads((tmp_path / f"bad-{r}.json").read_text())
        assert res["non_contiguous"]["error"] == "ValueError" and "not contiguous" in res["non_contiguous"]["message"]
        assert res["transposed"]["error"] == "ValueError" and "strides (1, 5)" in res["transposed"]["message"]
        assert res["broadcast_non_contiguous"]["error"] == "ValueError" and "'w'" in res["broadcast_non_contiguous"]["message"]
        assert res["meta"]["error"] == "ValueError" and "CPU tensors only" in res["meta"]["message"]
        assert res["float16"]["error"] == "TypeError" and "float16" in res["float16"]["message"]
        assert res["not_a_tensor"]["error"] == "TypeError"
        assert res["bad_op"]["error"] == "ValueError" and "prod" in res["bad_op"]["message"]
        assert res["still_works"] == [3.0, 3.0, 3.0]  # nothing had moved: the communicator still works
        mm = res["mismatch"]
        assert mm["error"] in ("PeerError", "PeerTimeoutError") and mm["peer_error"], mm
        assert "element count (1" in mm["message"], mm
        assert mm["elapsed"] < timeout + 2, mm


# -- in this process (one rank) -------------------------------------------------------


@pytest.fixture
def solo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = pst.init(comm=parasync.Communicator(0, 1, f"127.0.0.1:{port}", timeout=10))
    yield c
    pst.shutdown()


def test_tensors_are_shared_with_the_native_calls_not_copied():
    from parasync.torch._tensors import as_array

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    a = as_array(t)
    a[0] = 42.0
    assert t[0, 0].item() == 42.0 and a.shape == (6,)
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    ab = as_array(b)
    assert str(ab.dtype) == "bfloat16" and ab.tolist() == [1.5, -2.0]
    ab[1] = 3.0
    assert b[1].item() == 3.0
    w = torch.nn.Parameter(torch.ones(3))  # requires grad: still shared
    as_array(w)[:] = 7.0
    assert w.detach().tolist() == [7.0, 7.0, 7.0]
    assert as_array(torch.ones(2, dtype=torch.int64)).dtype == np.int64


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0: the CUDA check without a GPU."""

    @property
    def device(self):  # type: ignore[override]
        return torch.device("cuda", 0)


def test_non_cpu_tensors_get_a_clear_error():
    from parasync.torch._tensors import check_tensor

    with pytest.raises(ValueError, match="built without the NCCL backend"):
        check_tensor(torch.ones(2).as_subclass(_OnCuda))
    with pytest.raises(ValueError, match="on device meta: parasync.torch works on CPU tensors only"):
        pst.allreduce(torch.empty(2, device="meta"))
    with pytest.raises(TypeError, match="sparse"):
        pst.allreduce(torch.ones(2).to_sparse())


def test_functions_before_init_say_to_call_init():
    assert not pst.is_initialized()
    with pytest.raises(ValueError, match=r"call parasync.torch.init\(\) first"):
        pst.rank()
    with pytest.raises(ValueError, match=r"call parasync.torch.init\(\) first"):
        pst.allreduce(torch.ones(2))


def test_one_rank_api(solo):
    assert pst.init() is solo and (pst.rank(), pst.size()) == (0, 1)  # idempotent
    t = torch.arange(4.0)
    assert pst.allreduce(t, "sum") is t and t.tolist() == [0.0, 1.0, 2.0, 3.0]
    h = pst.allreduce_async(t)
    assert pst.synchronize(h) is t and pst.poll(h)
    odd = torch.tensor([True, False, True])  # 3 bytes: broadcast through a padded buffer
    assert pst.broadcast(odd, 0).tolist() == [True, False, True]
    assert pst.broadcast_object({"a": (1, 2)}) == {"a": (1, 2)}
    assert pst.allgather(torch.ones(2, 2)).shape == (1, 2, 2)
    model = torch.nn.Linear(3, 2)
    opt = pst.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), named_parameters=model.named_parameters())
    assert isinstance(opt, torch.optim.SGD)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = model.weight.detach().clone()
    opt.zero_grad()
    model(torch.ones(4, 3)).sum().backward()
    grad = model.weight.grad.clone()
    opt.step()
    sched.step()
    assert torch.equal(model.weight.detach(), before - 0.5 * grad)
    assert opt.param_groups[0]["lr"] == 0.25
    opt.load_state_dict(opt.state_dict())  # still averages after torch re-patches step()
    opt.zero_grad()
    model(torch.ones(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="more than backward_passes_per_step=1"):
        model(torch.ones(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="before step"):
        opt.zero_grad()
    opt.synchronize()
    opt.zero_grad()
    # The DDP hooks, on what DDP passes them (only GradBucket.buffer() is used).
    class Bucket:
        def __init__(self, t):
            self.t = t

        def buffer(self):
            return self.t

    buf = torch.full((3,), 2.5)
    assert pst.allreduce_hook(None, Bucket(buf)).wait() is buf and buf.tolist() == [2.5] * 3
    buf = torch.full((3,), 1.0 + 2**-12)  # not a bf16 value: rounded on the wire
    assert pst.bf16_compress_hook(pst.ParasyncProcessGroup(solo), Bucket(buf)).wait() is buf
    assert buf.tolist() == [1.0] * 3

    # Buckets start during the backward pass, not in step(): with 64-byte buckets, every
    # bucket is on its way when backward() returns.
    mlp = tc.make_model(0)
    opt = pst.DistributedOptimizer(torch.optim.SGD(mlp.parameters(), lr=0.1), bucket_bytes=64)
    assert len(opt._ps_buckets) == 4
    tc.loss_fn(mlp(torch.ones(2, tc.IN)), torch.tensor([0, 1])).backward()
    assert opt._ps_next == 4 and all(b.handle is not None for b in opt._ps_buckets)
    opt.step()
    with pytest.raises(ValueError, match="does not name 1"):
        pst.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=[("w", model.weight)])
