"""Shared by the PyTorch examples: the digits data of `_digits.py` as tensors, and the same
64-128-10 ReLU MLP as a ``torch.nn`` model."""

from __future__ import annotations

import torch

import _digits as D


def model(seed: int) -> torch.nn.Module:
    """The MLP with PyTorch's default initialisation, drawn from ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(D.FEATURES, D.HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(D.HIDDEN, D.CLASSES),
    )


def load(path=None, seed: int = 0):
    """(x_train, y_train, x_test, y_test) as tensors (float32 pixels, int64 labels)."""
    return tuple(torch.from_numpy(a) for a in D.load(path, seed))


def batches(n: int, batch: int, seed):
    """Endless mini-batches of row indices (tensors), as `_digits.batches`."""
    for i in D.batches(n, batch, seed):
        yield torch.from_numpy(i)


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(dim=1) == y).float().mean())
