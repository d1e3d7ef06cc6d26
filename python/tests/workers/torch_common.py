"""Model, data and reference training shared by the torch workers and tests/test_torch.py."""

from __future__ import annotations

import torch

IN, HIDDEN, OUT = 20, 32, 5


class MLP(torch.nn.Module):
    """20-32-5; ``extra`` adds a layer that only sees inputs on some ranks (unused elsewhere)."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, OUT)
        self.extra = torch.nn.Linear(OUT, OUT) if extra else None

    def forward(self, x: torch.Tensor, use_extra: bool = False) -> torch.Tensor:
        y = self.fc2(torch.tanh(self.fc1(x)))
        if self.extra is not None and use_extra:
            y = y + self.extra(y)
        return y


def make_model(seed: int, extra: bool = False, dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(seed)
    return MLP(extra).to(dtype)


def batch(seed: int, step: int, rows: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: rank r takes rows [r*b, (r+1)*b)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randn(rows, IN, generator=g).to(dtype)
    y = torch.randint(0, OUT, (rows,), generator=g)
    return x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, y)


def reference(cfg: dict, size: int) -> dict[str, torch.Tensor]:
    """Single-process training on the concatenated batches (mean loss over all rows)."""
    torch.set_num_threads(1)
    model = make_model(cfg["seed"], cfg.get("extra", False))
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    b = cfg["batch"]
    for step in range(cfg["steps"]):
        x, y = batch(cfg["seed"], step, b * size)
        opt.zero_grad()
        if cfg.get("extra"):
            # rank r's rows use the extra layer on steps where (step + r) % 3 == 0
            outs = []
            for r in range(size):
                xs = x[r * b : (r + 1) * b]
                outs.append(model(xs, use_extra=(step + r) % 3 == 0))
            out = torch.cat(outs)
        else:
            out = model(x)
        loss_fn(out, y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- comparisons (used by the tests) -------------------------------------------------------


def assert_identical(a, b, where: str = "") -> None:
    """Same structure, same values bit for bit (tensors: same dtype and bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert a.view(-1).view(torch.uint8).numpy().tobytes() == b.view(-1).view(torch.uint8).numpy().tobytes(), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a} vs {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_close(got: dict, want: dict, atol: float, what: str) -> None:
    assert set(got) == set(want), what
    for k in want:
        diff = (got[k].double() - want[k].double()).abs().max().item()
        assert diff <= atol, f"{what}: {k} differs by {diff:.3g} (allowed {atol})"
