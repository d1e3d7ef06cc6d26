"""One worker of the ParameterServerOptimizer tests (tests/test_torch_ps.py); argv[1] is a
JSON config. Saves its tensors to cfg["out"] (torch.save) and prints one JSON line."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_common as tc  # noqa: E402

import parasync  # noqa: E402
import parasync.torch as pst  # noqa: E402

torch.set_num_threads(1)
cfg = json.loads(sys.argv[1])
w, n = cfg["worker"], cfg["workers"]


def train_sync() -> dict:
    """Momentum SGD on the servers; this worker's rows of each global batch; the learning
    rate changes at cfg["lr_step"] through param_groups, as a scheduler would."""
    model = tc.make_model(cfg["seed"] + 17 * w)  # differs per worker: worker 0's values win
    with parasync.PsClient(cfg["addresses"], worker_id=w, pull_timeout=60) as client:
        opt = pst.ParameterServerOptimizer(model, client, parasync.SGD(cfg["lr"], momentum=0.9))
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        b = cfg["batch"]
        accepted = 0
        for step in range(cfg["steps"]):
            if step == cfg["lr_step"]:
                opt.param_groups[0]["lr"] = cfg["lr2"]
            x, y = tc.batch(cfg["seed"], step, b * n)
            opt.zero_grad()
            tc.loss_fn(model(x[w * b : (w + 1) * b]), y[w * b : (w + 1) * b]).backward()
            opt.step()
            accepted += opt.last_push.accepted
        return {"initial": initial, "final": model.state_dict(), "mode": opt.mode, "step": opt.step_count, "accepted": accepted}


class Linear(torch.nn.Module):
    """Loss = Σ c·w + Σ d·b: the gradients are the integer constants c and d."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 3))
        self.b = torch.nn.Parameter(torch.randn(3))
        self.unused = torch.nn.Parameter(torch.randn(2))  # never gets a gradient: pushes zeros


def train_async() -> dict:
    torch.manual_seed(w)
    model = Linear()
    if w == 0:
        with torch.no_grad():
            model.w.copy_(torch.arange(12.0).view(4, 3) * 100)
            model.b.fill_(7.0)
            model.unused.fill_(-1.0)
    c, d = torch.full((4, 3), float(w + 1)), torch.arange(3.0) - w
    staleness = []
    with parasync.PsClient(cfg["addresses"], worker_id=w, pull_timeout=60) as client:
        opt = pst.ParameterServerOptimizer(model, client, parasync.SGD(1.0))
        for _ in range(cfg["steps"]):
            opt.zero_grad()
            ((model.w * c).sum() + (model.b * d).sum()).backward()
            opt.step()
            staleness += opt.last_push.staleness
        return {"mode": opt.mode, "max_staleness": max(staleness), "pushes": len(staleness)}


result = {"sync": train_sync, "async": train_async}[cfg["scenario"]]()
torch.save(result, cfg["out"])
print(json.dumps({"worker": w, "ok": True}))
