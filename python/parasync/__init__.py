"""Parasync: a parameter server and collectives for distributed training.

- ``PsClient``: pull parameters and push gradients to ``parasync server`` shards (sync,
  async or bounded-staleness; optimizers run on the servers).
- ``Communicator`` / ``init()``: allreduce, broadcast, allgather, reduce_scatter, barrier
  between the ranks of a job, over TCP.

NumPy arrays are used in place and the GIL is released while bytes move.
"""

from ._native import __version__
from . import _errors
from ._errors import *  # noqa: F403  (the exception classes)
from ._spec import SGD, Adagrad, Adam, AdamW, Adopt, Constant, Normal, Uniform, VariableSpec, Zeros
from ._ps import PsClient, PushSummary
from ._comm import Communicator, Work, init

__all__ = [
    "__version__",
    "PsClient",
    "PushSummary",
    "VariableSpec",
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Zeros",
    "Constant",
    "Uniform",
    "Normal",
    "Adopt",
    "Communicator",
    "Work",
    "init",
    *_errors.__all__,
]
