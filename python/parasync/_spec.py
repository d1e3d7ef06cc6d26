"""What a trainer declares about its variables and sparse tables: optimizers,
initializers, specs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Tuple, Union

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


@dataclass(frozen=True)
class Ftrl:
    """FTRL-proximal (learning-rate power -1/2), for sparse tables only: ``l1`` drives
    elements of a row to exactly zero, ``l2`` shrinks them, ``beta`` smooths the early
    learning rate."""

    lr: float
    initial_accumulator: float = 0.1
    l1: float = 0.0
    l2: float = 0.0
    beta: float = 0.0


Optimizer = Union[SGD, Adagrad, Adam, AdamW]
TableOptimizer = Union[SGD, Adagrad, Adam, Ftrl]


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
        if isinstance(self.optimizer, Ftrl):
            raise TypeError(
                f"variable {self.name!r}: Ftrl is for sparse tables (TableSpec) only; "
                "a variable takes SGD, Adagrad, Adam or AdamW"
            )
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


# -- sparse tables ------------------------------------------------------------------------


@dataclass(frozen=True)
class RowUniform:
    """Each new row uniform in [low, high), drawn on the server from ``seed`` and the row's
    id: an id starts with the same row on every shard and every run."""

    low: float
    high: float
    seed: int = 0

    def _native(self) -> tuple:
        return ("uniform", self.low, self.high, self.seed)


@dataclass(frozen=True)
class RowNormal:
    """Each new row Normal(mean, stddev), drawn on the server from ``seed`` and the row's id."""

    mean: float = 0.0
    stddev: float = 1.0
    seed: int = 0

    def _native(self) -> tuple:
        return ("normal", self.mean, self.stddev, self.seed)


RowInitializer = Union[RowUniform, RowNormal]

Eviction = Union[None, str, Tuple[str, int]]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class TableSpec:
    """A sparse embedding table as the trainer declares it: rows of ``dim`` elements keyed
    by uint64 ids, spread over the shards by id and created on first use.

    Args:
        name: unique among the tables.
        dim: elements per row.
        dtype: storage dtype of the rows on the server, ``"f32"`` or ``"bf16"``.
        init: how a new row starts: None (zeros), ``RowUniform`` or ``RowNormal``.
        optimizer: the update of a row from its summed gradient, applied only to the rows a
            push names: ``SGD(lr)`` (no momentum), ``Adagrad``, ``Adam`` (lazy: each row
            counts its own steps; no weight decay) or ``Ftrl``.
        min_count: an id gets a row on its ``min_count``-th update; until then its lookups
            return the initial row and its updates are dropped (and counted).
        admit_probability: instead, an id gets a row on each update with this probability
            (a hash of ``admit_seed`` and the id: the same stream admits the same ids).
        eviction: what makes room when a shard holds ``capacity`` rows: None (new rows
            past it are not created), ``"lru"`` (least recently updated first), ``"lfu"``
            (least often updated first); or ``("ttl", steps)``: rows not updated for
            ``steps`` steps go.
        capacity: rows one shard holds at most (0: no limit).
    """

    name: str
    dim: int
    dtype: str = "f32"
    init: Union[RowInitializer, Zeros, None] = None
    optimizer: TableOptimizer = field(default_factory=lambda: SGD(0.01))
    min_count: Union[int, None] = None
    admit_probability: Union[float, None] = None
    admit_seed: int = 0
    eviction: Eviction = None
    capacity: int = 0

    def _native(self) -> tuple:
        who = f"table {self.name!r}"
        if not isinstance(self.name, str):
            raise TypeError(f"table name must be a str, got {type(self.name).__name__}")
        if not _is_int(self.dim) or self.dim < 1:
            raise ValueError(f"{who}: dim must be a positive int, got {self.dim!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"{who}: dtype must be 'f32' or 'bf16', got {self.dtype!r}")
        if self.init is None or isinstance(self.init, Zeros):
            init = None
        elif isinstance(self.init, (RowUniform, RowNormal)):
            init = self.init._native()
        else:
            raise TypeError(f"{who}: init must be None, RowUniform or RowNormal, got {self.init!r}")
        admission = self._admission(who)
        eviction = self._eviction(who)
        if not _is_int(self.capacity) or self.capacity < 0:
            raise ValueError(f"{who}: capacity must be a non-negative int, got {self.capacity!r}")
        return (
            self.name,
            int(self.dim),
            _DTYPES[self.dtype],
            init,
            _table_optimizer(self.optimizer, who),
            admission,
            eviction,
            int(self.capacity),
        )

    def _admission(self, who: str) -> tuple:
        if self.min_count is not None and self.admit_probability is not None:
            raise ValueError(f"{who}: min_count and admit_probability are alternatives; give one")
        if not _is_int(self.admit_seed) or self.admit_seed < 0:
            raise ValueError(f"{who}: admit_seed must be a non-negative int, got {self.admit_seed!r}")
        if self.min_count is not None:
            if not _is_int(self.min_count) or not 1 <= self.min_count < 2**32:
                raise ValueError(f"{who}: min_count must be a positive int, got {self.min_count!r}")
            return ("min_count", int(self.min_count), 0.0, 0)
        if self.admit_probability is not None:
            p = self.admit_probability
            if not isinstance(p, (int, float, np.floating)) or not 0.0 < p <= 1.0:
                raise ValueError(f"{who}: admit_probability must be in (0, 1], got {p!r}")
            return ("probability", 0, float(p), int(self.admit_seed))
        return ("always", 0, 0.0, 0)

    def _eviction(self, who: str) -> tuple:
        e = self.eviction
        if e is None:
            return ("none", 0)
        if e in ("lru", "lfu"):
            if not self.capacity:
                raise ValueError(f"{who}: eviction {e!r} needs a capacity (rows per shard)")
            return (e, 0)
        if isinstance(e, (tuple, list)) and len(e) == 2 and e[0] == "ttl":
            if not _is_int(e[1]) or e[1] < 1:
                raise ValueError(f"{who}: eviction ('ttl', steps) needs steps >= 1, got {e[1]!r}")
            return ("ttl", int(e[1]))
        raise ValueError(f"{who}: eviction must be None, 'lru', 'lfu' or ('ttl', steps), got {e!r}")


def _table_optimizer(o: object, who: str) -> tuple:
    """``(kind, lr, beta1, beta2, epsilon, initial_accumulator, l1, l2, beta)``."""
    if isinstance(o, SGD):
        if o.momentum != 0.0 or o.nesterov:
            raise ValueError(f"{who}: SGD for a table has no momentum (got momentum={o.momentum}, nesterov={o.nesterov})")
        return ("sgd", o.lr, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    if isinstance(o, Adagrad):
        return ("adagrad", o.lr, 0.0, 0.0, o.epsilon, o.initial_accumulator, 0.0, 0.0, 0.0)
    if isinstance(o, Adam):
        if o.weight_decay != 0.0:
            raise ValueError(
                f"{who}: {type(o).__name__} for a table has no weight decay (got weight_decay={o.weight_decay})"
            )
        return ("adam", o.lr, o.beta1, o.beta2, o.epsilon, 0.0, 0.0, 0.0, 0.0)
    if isinstance(o, Ftrl):
        return ("ftrl", o.lr, 0.0, 0.0, 0.0, o.initial_accumulator, o.l1, o.l2, o.beta)
    raise TypeError(f"{who}: optimizer must be SGD, Adagrad, Adam or Ftrl, got {o!r}")
