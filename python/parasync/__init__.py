"""Parasync: a parameter server and collectives for distributed training.

- ``PsClient``: pull parameters and push gradients to ``parasync server`` shards (sync,
  async or bounded-staleness; optimizers run on the servers).
- ``Communicator`` / ``init()``: allreduce, broadcast, allgather, reduce_scatter, barrier
  between the ranks of a job, over TCP.

NumPy arrays are used in place and the GIL is released while bytes move.
"""

from ._native import __version__
from ._errors import (
    CommunicatorPoisonedError,
    LaunchEnvironmentError,
    ParasyncError,
    PeerError,
    PeerTimeoutError,
    PsAlreadyExistsError,
    PsError,
    PsFailedPreconditionError,
    PsInvalidArgumentError,
    PsNotFoundError,
    PsOutOfRangeError,
    PsTimeoutError,
    PsUnavailableError,
    RendezvousError,
)
from ._spec import SGD, Adagrad, Adam, AdamW, Constant, Normal, Uniform, VariableSpec, Zeros
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
    "Communicator",
    "Work",
    "init",
    "ParasyncError",
    "PsError",
    "PsUnavailableError",
    "PsTimeoutError",
    "PsInvalidArgumentError",
    "PsNotFoundError",
    "PsAlreadyExistsError",
    "PsFailedPreconditionError",
    "PsOutOfRangeError",
    "PeerError",
    "PeerTimeoutError",
    "RendezvousError",
    "LaunchEnvironmentError",
    "CommunicatorPoisonedError",
]
