"""Parasync: a parameter server and collectives for distributed training.

- ``PsClient``: pull parameters and push gradients to ``parasync server`` shards (sync,
  async or bounded-staleness; optimizers run on the servers), and look up and update rows
  of sparse embedding tables by id (``TableSpec``, ``lookup``, ``push_sparse``).
- ``Communicator`` / ``init()``: allreduce, broadcast, allgather, reduce_scatter, barrier
  between the ranks of a job, over TCP.

NumPy arrays are used in place and the GIL is released while bytes move.
"""

from ._native import __version__
from . import _errors
from ._errors import *  # noqa: F403  (the exception classes)
from ._spec import (
    SGD,
    Adagrad,
    Adam,
    AdamW,
    Adopt,
    Constant,
    Ftrl,
    Normal,
    RowNormal,
    RowUniform,
    TableSpec,
    Uniform,
    VariableSpec,
    Zeros,
)
from ._ps import PsClient, PushSummary, SparsePushSummary
from ._comm import Communicator, Work, init

__all__ = [
    "__version__",
    "PsClient",
    "PushSummary",
    "SparsePushSummary",
    "VariableSpec",
    "TableSpec",
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Ftrl",
    "Zeros",
    "Constant",
    "Uniform",
    "Normal",
    "Adopt",
    "RowUniform",
    "RowNormal",
    "Communicator",
    "Work",
    "init",
    *_errors.__all__,
]
