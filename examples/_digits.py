"""Shared by the examples: the digits data (UCI optical digits, CC BY 4.0, see
data/README.md) and a 64-128-10 ReLU MLP with softmax cross-entropy in plain numpy.

Parameters live in ONE flat float32 buffer; ``unflatten`` gives named views into it, so
the same memory can be broadcast / allreduced whole or pushed and pulled per variable.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "data" / "digits.csv.gz"
FEATURES, HIDDEN, CLASSES = 64, 128, 10
SHAPES = {"mlp/w1": (FEATURES, HIDDEN), "mlp/b1": (HIDDEN,), "mlp/w2": (HIDDEN, CLASSES), "mlp/b2": (CLASSES,)}
SIZE = sum(int(np.prod(s)) for s in SHAPES.values())


def load(path: str | os.PathLike | None = None, seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a seeded shuffled split."""
    raw = np.loadtxt(path or DATA, delimiter=",", dtype=np.int64)
    x, y = (raw[:, :FEATURES] / 16.0).astype(np.float32), raw[:, FEATURES]
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def unflatten(flat: np.ndarray) -> dict[str, np.ndarray]:
    """Named, C-contiguous views of a flat buffer of SIZE elements (writes go through)."""
    out, at = {}, 0
    for name, shape in SHAPES.items():
        n = int(np.prod(shape))
        out[name] = flat[at : at + n].reshape(shape)
        at += n
    return out


def init_params(seed: int = 0) -> np.ndarray:
    """Flat initial values: He-uniform w1, Glorot-uniform w2, zero biases. Same seed, same values."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(SIZE, dtype=np.float32)
    p = unflatten(flat)
    he, glorot = np.sqrt(6 / FEATURES), np.sqrt(6 / (HIDDEN + CLASSES))
    p["mlp/w1"][:] = rng.uniform(-he, he, SHAPES["mlp/w1"])
    p["mlp/w2"][:] = rng.uniform(-glorot, glorot, SHAPES["mlp/w2"])
    return flat


def logits(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ p["mlp/w1"] + p["mlp/b1"], 0) @ p["mlp/w2"] + p["mlp/b2"]


def loss_and_grads(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, g: dict[str, np.ndarray]) -> float:
    """Mean cross-entropy of the batch; its gradients are written into the arrays of ``g``."""
    h = np.maximum(x @ p["mlp/w1"] + p["mlp/b1"], 0)
    z = h @ p["mlp/w2"] + p["mlp/b2"]
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(np.mean(np.log(e.sum(axis=1)) - z[rows, y]))
    d = prob
    d[rows, y] -= 1
    d /= len(y)  # d(mean loss) / d(logits)
    np.matmul(h.T, d, out=g["mlp/w2"])
    g["mlp/b2"][:] = d.sum(axis=0)
    dh = (d @ p["mlp/w2"].T) * (h > 0)
    np.matmul(x.T, dh, out=g["mlp/w1"])
    g["mlp/b1"][:] = dh.sum(axis=0)
    return loss


def accuracy(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits(p, x), axis=1) == y))


def batches(n: int, batch: int, seed):
    """Endless mini-batches of indices into ``0..n``: a fresh seeded shuffle each epoch,
    full batches only. `seed`: anything numpy.random.default_rng takes."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch]


def training_args(ap: argparse.ArgumentParser, who: str, lr_default: str) -> None:
    """The options every example takes: steps, batch, learning rate, seed, data, --json.
    ``who``: "worker" or "rank"."""
    ap.add_argument("--steps", type=int, default=500, help=f"steps per {who}")
    ap.add_argument("--batch", type=int, default=32, help=f"mini-batch per {who} and step")
    ap.add_argument("--lr", type=float, help=f"learning rate (default: {lr_default})")
    ap.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights, the batches")
    ap.add_argument("--data", help=f"the digits gzip CSV (default: {DATA})")
    ap.add_argument("--json", action="store_true", help="print one JSON line with the results")


def ps_args(ap: argparse.ArgumentParser) -> None:
    """The options of the parameter-server examples: mode, workers, shards, addresses."""
    ap.add_argument("--mode", choices=["sync", "async", "bounded"], default="sync")
    ap.add_argument("--workers", type=int, default=4, help="worker processes")
    ap.add_argument("--shards", type=int, default=2, help="server shards to start (without --addresses)")
    ap.add_argument("--addresses", help="host:port,... of running shards (started with the same --mode and --num-workers)")
    training_args(ap, "worker", "0.1 x workers in sync mode, else 0.1")


def ps_report(args: argparse.Namespace, done: list[dict], accuracy: float, workers: int, shards: int, seconds: float, test_rows: int) -> dict:
    """The parameter-server examples' result (printed): ``done`` holds what the workers
    returned (their seconds, last loss, dropped gradients)."""
    report = {
        "mode": args.mode,
        "workers": workers,
        "shards": shards,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "accuracy": accuracy,
        "loss": sum(d["loss"] for d in done) / len(done),
        "steps_per_s": sum(args.steps / d["seconds"] for d in done) / len(done),
        "seconds": seconds,
        "dropped_stale": sum(d["dropped_stale"] for d in done),
    }
    print_report(report, args.json, test_rows, "per worker")
    return report


def print_report(report: dict, as_json: bool, test_rows: int, per: str) -> None:
    """The result: one JSON line, or two lines for people. ``per``: what steps/s counts."""
    if as_json:
        print(json.dumps(report), flush=True)
    else:
        print(f"held-out accuracy {report['accuracy']:.4f} ({test_rows} rows), last loss {report['loss']:.4f}")
        print(f"{report['steps_per_s']:.0f} steps/s {per}, {report['seconds']:.1f} s in all", flush=True)
