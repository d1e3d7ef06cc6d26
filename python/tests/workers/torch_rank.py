"""One rank of the torch tests (started by `python -m parasync.launch` or torchrun); argv[1]
is a JSON config: {"scenario": ..., "out": directory, ...}. Results go to
<out>/<scenario>-<rank>.pt (torch.save) or .json."""

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_common as tc  # noqa: E402

import parasync  # noqa: E402
import parasync.torch as pst  # noqa: E402

torch.set_num_threads(1)
cfg = json.loads(sys.argv[1])
out = Path(cfg["out"])


def save(obj, name):
    torch.save(obj, out / f"{name}-{pst.rank()}.pt")


def save_json(obj, name):
    (out / f"{name}-{pst.rank()}.json").write_text(json.dumps(obj))


def train_distributed(v: dict) -> dict:
    """DistributedOptimizer on this rank's rows of each global batch."""
    r, n = pst.rank(), pst.size()
    model = tc.make_model(v["seed"] + 17 * r, v.get("extra", False))  # rank-dependent: fixed by the broadcast
    pst.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = torch.optim.SGD(model.parameters(), lr=v["lr"], momentum=0.9)
    opt = pst.DistributedOptimizer(
        opt,
        named_parameters=model.named_parameters(),
        backward_passes_per_step=v.get("k", 1),
        compression=v.get("compression"),
        bucket_bytes=v.get("bucket_bytes", pst.DEFAULT_BUCKET_BYTES),
    )
    b, k = v["batch"], v.get("k", 1)
    for step in range(v["steps"]):
        x, y = tc.batch(v["seed"], step, b * n)
        x, y = x[r * b : (r + 1) * b], y[r * b : (r + 1) * b]
        opt.zero_grad()
        m = b // k
        for j in range(k):  # k micro-batches, loss scaled by 1/k: the mean over the rows
            xs, ys = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
            loss = tc.loss_fn(model(xs, use_extra=(step + r) % 3 == 0), ys) / k
            loss.backward()
        opt.step()
    return {kk: vv.detach().clone() for kk, vv in model.state_dict().items()}


def scenario_dopt():
    pst.init(timeout=60)
    results = {}
    for v in cfg["variants"]:
        t = time.monotonic()
        results[v["name"]] = train_distributed(v)
        results[v["name"] + ":seconds"] = time.monotonic() - t
    save(results, "dopt")


def scenario_ddp():
    """Under torchrun, with the "parasync" torch.distributed backend as the default group:
    DDP over Gloo (a Gloo group), DDP + allreduce_hook and + bf16_compress_hook (set up over
    the Gloo group, gradients over Parasync), plain DDP over the default "parasync" group;
    the same initial weights and rows for each. Then the backend's collectives."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("parasync")  # rendezvous through torchrun's store on MASTER_PORT
    assert dist.get_backend() == "parasync", dist.get_backend()
    gloo = dist.new_group(backend="gloo")
    pst.init(timeout=60)  # the module communicator: MASTER_PORT + 1 under torchrun
    assert (pst.rank(), pst.size()) == (dist.get_rank(), dist.get_world_size())
    r, n = pst.rank(), pst.size()
    v = cfg["variant"]
    results = {}
    runs = (("gloo", gloo, None), ("hook", gloo, pst.allreduce_hook), ("bf16", gloo, pst.bf16_compress_hook), ("backend", None, None))
    for name, group, hook in runs:
        model = tc.make_model(v["seed"] + 17 * r)  # DDP broadcasts rank 0's at construction
        ddp = DDP(model, process_group=group, bucket_cap_mb=v.get("bucket_cap_mb", 25))
        if hook is not None:
            ddp.register_comm_hook(None, hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=v["lr"], momentum=0.9)
        b = v["batch"]
        t = time.monotonic()
        for step in range(v["steps"]):
            x, y = tc.batch(v["seed"], step, b * n)
            x, y = x[r * b : (r + 1) * b], y[r * b : (r + 1) * b]
            opt.zero_grad()
            tc.loss_fn(ddp(x), y).backward()
            opt.step()
        results[name] = {kk: vv.detach().clone() for kk, vv in model.state_dict().items()}
        results[name + ":seconds"] = time.monotonic() - t

    # the backend's collectives, sync and async
    c = {}
    t = torch.full((3,), float(r + 1))
    dist.all_reduce(t)
    c["all_reduce_sum"] = t
    t = torch.full((3,), float(r + 1), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    c["all_reduce_max"] = t
    t = torch.full((2,), float(r + 1), dtype=torch.bfloat16)
    dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True).wait()
    c["all_reduce_avg_async"] = t
    t = torch.arange(4, dtype=torch.int64) * (r + 1)
    dist.broadcast(t, src=n - 1)
    c["broadcast"] = t
    odd = torch.tensor([r == 0, True, False])
    dist.broadcast(odd, src=0)
    c["broadcast_bool"] = odd
    outs = [torch.empty(2) for _ in range(n)]
    dist.all_gather(outs, torch.full((2,), float(r)))
    c["all_gather"] = torch.stack(outs)
    big = torch.empty(2 * n, dtype=torch.int32)
    dist.all_gather_into_tensor(big, torch.full((2,), r, dtype=torch.int32))
    c["all_gather_into_tensor"] = big
    o = torch.empty(2)
    dist.reduce_scatter(o, [torch.full((2,), float(i + r)) for i in range(n)])
    c["reduce_scatter"] = o
    o = torch.empty(2)
    dist.reduce_scatter_tensor(o, torch.arange(2.0 * n) + r)
    c["reduce_scatter_tensor"] = o
    dist.barrier()
    try:
        dist.send(torch.ones(1), dst=(r + 1) % n)
        c["send"] = "no error"
    except Exception as e:  # noqa: BLE001
        c["send"] = f"{type(e).__name__}: {e}"
    results["collectives"] = c
    save(results, "ddp")
    dist.destroy_process_group()


class WithBuffers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = tc.MLP()
        self.bn = torch.nn.BatchNorm1d(tc.OUT)
        self.register_buffer("mask", torch.zeros(7, dtype=torch.bool))  # 7 bytes: the padded path
        self.register_buffer("h16", torch.zeros(3, dtype=torch.float16))

    def forward(self, x):
        return self.bn(self.mlp(x))


def scenario_bcast():
    """Rank-dependent init, lr and number of Adam steps (rank 1: none, so no Adam state),
    then broadcast_parameters + broadcast_optimizer_state; one more step everywhere with a
    DistributedOptimizer keeps the ranks identical."""
    pst.init(timeout=60)
    r, n = pst.rank(), pst.size()
    torch.manual_seed(100 + r)
    model = WithBuffers()
    model.mask.fill_(r % 2 == 0)
    model.mask[r % 7] = True
    model.h16.fill_(r + 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (r + 1), betas=(0.9, 0.99 - 0.01 * r), weight_decay=0.001 * r)
    steps = {0: 3, 1: 0}.get(r, r)
    for step in range(steps):
        x, y = tc.batch(5 + r, step, 8)
        opt.zero_grad()
        tc.loss_fn(model(x), y).backward()
        opt.step()
    pst.broadcast_parameters(model.state_dict(), root_rank=0)
    pst.broadcast_optimizer_state(opt, root_rank=0)
    after = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": copy.deepcopy(opt.state_dict())}
    opt = pst.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    x, y = tc.batch(9, 0, 8 * n)
    opt.zero_grad()
    tc.loss_fn(model(x[r * 8 : (r + 1) * 8]), y[r * 8 : (r + 1) * 8]).backward()
    opt.step()
    after["next_model"] = {k: v.clone() for k, v in model.state_dict().items() if "bn.running" not in k}
    after["next_opt"] = opt.state_dict()
    save(after, "bcast")


def scenario_kill():
    """Rank `victim` SIGKILLs itself in the middle of a backward pass at step 2; the others
    report what their step raised and how long it took. `via`: "dopt" (DistributedOptimizer),
    "backend" (DDP over the "parasync" process group) or "hook" (DDP over Gloo with
    allreduce_hook on a "parasync" group)."""
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    via = cfg.get("via", "dopt")
    model = tc.make_model(1)
    if via == "dopt":
        pst.init(timeout=cfg["timeout"])
        r, n = pst.rank(), pst.size()
        net, opt = model, pst.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), bucket_bytes=1024)
    else:
        dist.init_process_group("parasync" if via == "backend" else "gloo", timeout=datetime.timedelta(seconds=cfg["timeout"]))
        r, n = dist.get_rank(), dist.get_world_size()
        net = DDP(model, bucket_cap_mb=0.001)  # several buckets: some are on the wire when the victim dies
        if via == "hook":
            net.register_comm_hook(dist.new_group(backend="parasync", timeout=datetime.timedelta(seconds=cfg["timeout"])), pst.allreduce_hook)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
    started = None
    try:
        for step in range(5):
            x, y = tc.batch(1, step, 8 * n)
            opt.zero_grad()
            logits = net(x[r * 8 : (r + 1) * 8])
            if step == 2:
                if r == cfg["victim"]:
                    # dies once the first bucket (fc2) has been started
                    model.fc1.weight.register_post_accumulate_grad_hook(lambda p: os.kill(os.getpid(), signal.SIGKILL))
                started = time.monotonic()
            tc.loss_fn(logits, y[r * 8 : (r + 1) * 8]).backward()
            opt.step()
    except Exception as e:  # noqa: BLE001  (DDP raises the collective's error as a RuntimeError)
        line = {"error": type(e).__name__, "rank": getattr(e, "rank", None), "message": str(e),
                "elapsed": time.monotonic() - started if started else None}
        (out / f"kill-{r}.json").write_text(json.dumps(line))
        return
    (out / f"kill-{r}.json").write_text(json.dumps({"error": None}))


def scenario_bad():
    """Wrong inputs: each raises on this rank before anything moves (the communicator still
    works), then allreduce with shapes that differ between ranks raises on every rank."""
    pst.init(timeout=cfg["timeout"])
    r = pst.rank()
    res = {}
    cases = {
        "non_contiguous": lambda: pst.allreduce(torch.ones(4, 4)[:, 1]),
        "transposed": lambda: pst.allreduce(torch.ones(3, 5).t()),
        "meta": lambda: pst.allreduce(torch.empty(4, device="meta")),
        "float16": lambda: pst.allreduce(torch.ones(4, dtype=torch.float16)),
        "not_a_tensor": lambda: pst.allreduce([1.0, 2.0]),
        "bad_op": lambda: pst.allreduce(torch.ones(4), "prod"),
        "broadcast_non_contiguous": lambda: pst.broadcast_parameters({"w": torch.ones(4, 4).t()}),
    }
    for name, call in cases.items():
        try:
            call()
            res[name] = {"error": None}
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": type(e).__name__, "message": str(e)}
    t = torch.full((3,), float(r + 1))
    pst.allreduce(t, "sum")
    res["still_works"] = t.tolist()
    started = time.monotonic()
    try:
        pst.allreduce(torch.ones(10 + r))
        res["mismatch"] = {"error": None}
    except Exception as e:  # noqa: BLE001
        res["mismatch"] = {"error": type(e).__name__, "message": str(e), "peer_error": isinstance(e, parasync.PeerError)}
    res["mismatch"]["elapsed"] = time.monotonic() - started
    save_json(res, "bad")


{"dopt": scenario_dopt, "ddp": scenario_ddp, "bcast": scenario_bcast, "kill": scenario_kill, "bad": scenario_bad}[cfg["scenario"]]()
