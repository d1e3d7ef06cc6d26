"""PyTorch data-parallel step time on Parasync beside PyTorch's Gloo, in one job.

    python -m parasync.launch -n 4 benches/torch_bench.py --rounds 3 --steps 8
    python benches/torch_bench.py summary bench-results/raw/torch-<date>.txt

Every rank builds a model with the parameter shapes of a real network (ResNet-50 from
``../shared/data/model_shapes.json``: 161 tensors, 25.6 M float32 parameters, 102 MB of
gradients a step) whose loss is ``Σ p.sum() · s`` for a scalar ``s``: the backward pass
writes a dense gradient into every parameter, in reverse order, as a real one does, at
little compute cost, so the step time is what the gradient exchange costs. Variants, run
in turns within each round (the order rotates from round to round):

- ``local``: no exchange at all (each rank trains alone): the floor under every other variant;
- ``ddp-gloo``: ``DistributedDataParallel`` over a Gloo process group (PyTorch's CPU default);
- ``ddp-hook``: the same DDP, its buckets reduced by ``parasync.torch.allreduce_hook``;
- ``ddp-backend``: DDP over the ``"parasync"`` torch.distributed backend;
- ``dopt``: ``parasync.torch.DistributedOptimizer`` (fused 25 MiB buckets, started from
  the backward pass);
- ``horovod-gloo``: Horovod's recipe over Gloo: one asynchronous allreduce per parameter,
  started from its gradient hook, all awaited before ``step()``, then divided by N;
- ``ar-gloo``, ``ar-parasync``: the exchange alone, no training: the gradients' bytes as
  DDP's 25 MiB buckets, all allreduced at once (asynchronously) and awaited, over Gloo and
  over Parasync: what the exchange costs when it has the cores to itself.

A step is ``zero_grad``, forward, backward, SGD ``step``; each variant runs ``--warmup``
untimed steps then ``--steps`` timed ones; the figure is rank 0's median step time over
all rounds. Every result is one ``#json {...}`` line; ``summary`` prints the medians and
the ratios against Gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SHAPES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "model_shapes.json"
VARIANTS = ["local", "ddp-gloo", "ddp-hook", "ddp-backend", "dopt", "horovod-gloo", "ar-gloo", "ar-parasync"]


def emit(record: dict) -> None:
    print("#json " + json.dumps(record, sort_keys=True), flush=True)


def run(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import parasync.torch as pst

    torch.set_num_threads(1)
    shapes = json.loads(Path(args.shapes).read_text())["models"][args.model]

    class Shaped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.params = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(s)) for _, s in shapes)

        def forward(self, s: torch.Tensor) -> torch.Tensor:
            # d/dp (p.sum() * s) = s everywhere: one read of p forward, one write of p.grad backward
            return sum(p.sum() * s for p in self.params)

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=args.timeout))
    gloo = dist.group.WORLD
    pg = dist.new_group(backend="parasync", timeout=__import__("datetime").timedelta(seconds=args.timeout))
    pst.init(comm=pg.comm)
    rank, n = dist.get_rank(), dist.get_world_size()
    numel = sum(int(torch.tensor(s).prod()) for _, s in shapes)
    if rank == 0:
        print(f"# {args.model}: {len(shapes)} tensors, {numel / 1e6:.1f} M parameters, {n} ranks, torch {torch.__version__}", flush=True)

    def make(variant: str):
        if variant.startswith("ar-"):
            ex = ExchangeOnly(variant[3:])
            return ex, ex
        model = Shaped()
        if variant.startswith("ddp-"):
            net = DDP(model, process_group=pg if variant == "ddp-backend" else gloo, gradient_as_bucket_view=args.bucket_view)
            if variant == "ddp-hook":
                net.register_comm_hook(pg, pst.allreduce_hook)
            return net, torch.optim.SGD(net.parameters(), lr=1e-6)
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)
        if variant == "local":
            return model, opt
        if variant == "dopt":
            return model, pst.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        handles = []  # horovod-gloo

        def hook(p: torch.Tensor) -> None:
            handles.append(dist.all_reduce(p.grad, group=gloo, async_op=True))

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(hook)

        class HorovodRecipe:
            def zero_grad(self) -> None:
                opt.zero_grad()

            def step(self) -> None:
                for h in handles:
                    h.wait()
                handles.clear()
                for p in model.parameters():
                    p.grad.div_(n)
                opt.step()

        return model, HorovodRecipe()

    class ExchangeOnly:
        """Allreduces DDP-sized buckets of the model's bytes (avg), no training."""

        def __init__(self, over: str) -> None:
            per = 25 * 1024 * 1024 // 4
            self.buckets = [torch.ones(min(per, numel - i)) for i in range(0, numel, per)]
            self.over = over

        def zero_grad(self) -> None:
            pass

        def __call__(self, s: torch.Tensor) -> "ExchangeOnly":
            return self

        def backward(self) -> None:
            if self.over == "gloo":
                works = [dist.all_reduce(b, group=gloo, async_op=True) for b in self.buckets]
                for w in works:
                    w.wait()
                for b in self.buckets:
                    b.div_(n)
            else:
                for h in [pst.allreduce_async(b, pst.Average) for b in self.buckets]:
                    h.wait()

        def step(self) -> None:
            pass

    s = torch.tensor(1.0)
    for rnd in range(args.rounds):
        order = VARIANTS[rnd % len(VARIANTS) :] + VARIANTS[: rnd % len(VARIANTS)]
        for variant in order:
            if variant not in args.variants:
                continue
            net, opt = make(variant)
            times = []
            for i in range(args.warmup + args.steps):
                t = time.perf_counter()
                opt.zero_grad()
                net(s).backward()
                opt.step()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t)
            if rank == 0:
                med = statistics.median(times)
                print(f"round {rnd} {variant:13s} N={n}  median step {med * 1e3:8.1f} ms  ({len(times)} steps)", flush=True)
                emit({"bench": "torch-step", "variant": variant, "ranks": n, "round": rnd, "steps_s": times, "model": args.model,
                      "bucket_view": args.bucket_view})
            del net, opt
            dist.barrier(group=gloo)
    pst.shutdown()
    dist.destroy_process_group()


def summary(path: str) -> None:
    recs = [json.loads(ln[6:]) for ln in Path(path).read_text().splitlines() if ln.startswith("#json ")]
    by: dict[tuple, list[float]] = {}
    for r in recs:
        if r["bench"] == "torch-step":
            name = r["variant"] + (" (bucket view)" if r.get("bucket_view") and r["variant"].startswith("ddp-") else "")
            by.setdefault((r["ranks"], name), []).extend(r["steps_s"])
    print("| ranks | variant | median step (ms) | steps | ddp-gloo / this | horovod-gloo / this | step − local (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in sorted({k[0] for k in by}):
        med = {v: statistics.median(t) for (m, v), t in by.items() if m == n}
        for v in [x for base in VARIANTS for x in (base, base + " (bucket view)")]:
            if v not in med:
                continue
            gloo = "ddp-gloo (bucket view)" if "bucket view" in v else "ddp-gloo"
            ratio = lambda peer: f"{med[peer] / med[v]:.2f}×" if peer in med else "n/a"  # noqa: E731
            extra = f"{(med[v] - med['local']) * 1e3:.1f}" if "local" in med and v != "local" else ""
            print(f"| {n} | {v} | {med[v] * 1e3:.1f} | {len(by[(n, v)])} | {ratio(gloo)} | {ratio('horovod-gloo')} | {extra} |")
    ps = [r for r in recs if r["bench"] in ("torch-ps", "numpy-ps", "demo")]
    if ps:
        print()
        print("| program | mode | steps/s per worker (median) | runs | held-out accuracy (median) |")
        print("| --- | --- | --- | --- | --- |")
        keys = sorted({(r["bench"], r["mode"]) for r in ps})
        for b, m in keys:
            rs = [r for r in ps if (r["bench"], r["mode"]) == (b, m)]
            print(f"| {b} | {m} | {statistics.median(r['steps_per_s'] for r in rs):.0f} | {len(rs)} | "
                  f"{statistics.median(r['accuracy'] for r in rs):.4f} |")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "summary":
        return summary(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50", help="a model of model_shapes.json")
    ap.add_argument("--shapes", default=os.environ.get("MODEL_SHAPES", str(SHAPES)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--bucket-view", action="store_true", help="DDP(gradient_as_bucket_view=True) for every DDP variant")
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    run(args)


if __name__ == "__main__":
    main()
