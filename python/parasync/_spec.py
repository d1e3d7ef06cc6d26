"""What a trainer declares about its variables: optimizers, initializers, specs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np


@dataclass(frozen=True)
class SGD:
    """SGD with optional (Nesterov) momentum, applied on the server."""

    lr: float
    momentum: float = 0.0
    nesterov: bool = False

    def _native(self) -> tuple:
        return ("sgd", self.lr, self.momentum, self.nesterov, 0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Adagrad:
    """Adagrad."""

    lr: float
    initial_accumulator: float = 0.1
    epsilon: float = 1e-7

    def _native(self) -> tuple:
        return ("adagrad", self.lr, 0.0, False, 0.0, 0.0, self.epsilon, 0.0, self.initial_accumulator)


@dataclass(frozen=True)
class Adam:
    """Adam; a non-zero ``weight_decay`` is L2, added to the gradient."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 0.0

    _kind = "adam"

    def _native(self) -> tuple:
        return (self._kind, self.lr, 0.0, False, self.beta1, self.beta2, self.epsilon, self.weight_decay, 0.0)


@dataclass(frozen=True)
class AdamW(Adam):
    """AdamW: decoupled weight decay."""

    weight_decay: float = 0.01

    _kind = "adamw"


Optimizer = Union[SGD, Adagrad, Adam, AdamW]


@dataclass(frozen=True)
class Zeros:
    """All zeros."""

    def _native(self) -> tuple:
        return ("zeros", 0.0, 0.0, 0)


@dataclass(frozen=True)
class Constant:
    """One value everywhere."""

    value: float

    def _native(self) -> tuple:
        return ("constant", self.value, 0.0, 0)


@dataclass(frozen=True)
class Uniform:
    """Uniform in [low, high), drawn on the server from ``seed``."""

    low: float
    high: float
    seed: int = 0

    def _native(self) -> tuple:
        return ("uniform", self.low, self.high, self.seed)


@dataclass(frozen=True)
class Normal:
    """Normal(mean, stddev), drawn on the server from ``seed``."""

    mean: float = 0.0
    stddev: float = 1.0
    seed: int = 0

    def _native(self) -> tuple:
        return ("normal", self.mean, self.stddev, self.seed)


@dataclass(frozen=True)
class Adopt:
    """No values of this worker's own: the variable takes those another worker (the chief)
    registers it with, whichever registers first. Until they arrive, pulls wait (up to
    the pull timeout) and pushes are refused. A variable that already holds values (a
    restarted worker, a restored server) keeps them."""

    def _native(self) -> tuple:
        return ("adopt", 0.0, 0.0, 0)


Initializer = Union[Zeros, Constant, Uniform, Normal, Adopt]

_DTYPES = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class VariableSpec:
    """A variable as the trainer declares it.

    ``init`` is an initializer, or the initial values (anything ``numpy.asarray`` turns into
    the variable's shape; converted to float32 once, at registration). ``dtype`` is the
    storage dtype on the server: ``"f32"`` or ``"bf16"``.
    """

    name: str
    shape: Sequence[int]
    optimizer: Optimizer = field(default_factory=lambda: SGD(0.01))
    init: Union[Initializer, np.ndarray, None] = None
    dtype: str = "f32"
    stochastic_rounding: bool = False

    def _native(self) -> tuple:
        if self.dtype not in _DTYPES:
            raise ValueError(f"variable {self.name!r}: dtype must be 'f32' or 'bf16', got {self.dtype!r}")
        init = self.init
        if init is not None and not hasattr(init, "_native"):
            values = np.ascontiguousarray(init, dtype=np.float32)
            if values.shape != tuple(self.shape):
                raise ValueError(
                    f"variable {self.name!r} has shape {list(self.shape)}, its initial values have shape {list(values.shape)}"
                )
            init = values
        elif init is not None:
            init = init._native()
        if not hasattr(self.optimizer, "_native"):
            raise TypeError(f"variable {self.name!r}: optimizer must be SGD, Adagrad, Adam or AdamW, got {self.optimizer!r}")
        return (
            self.name,
            [int(d) for d in self.shape],
            _DTYPES[self.dtype],
            self.optimizer._native(),
            init,
            self.stochastic_rounding,
        )
