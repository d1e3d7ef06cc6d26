"""`Communicator`: collectives between the ranks of a job, on numpy arrays in place."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _native

Work = _native.Work


class Communicator:
    """A group of ranks running collectives together.

    Every rank calls the same operations in the same order. Arrays (float32, float64,
    int32, int64, ``ml_dtypes.bfloat16``; C-contiguous) are reduced in place, with the GIL
    released. ``*_async`` calls return a ``Work``: the operation runs on the communicator's
    thread, and the arrays must not be touched until ``wait()`` returns them. A rank that
    dies or stops answering makes the others raise ``PeerError`` naming it, within
    ``timeout`` seconds; the communicator cannot be used after an error.

    ``Communicator(rank, size, master="host:port")`` joins explicitly (rank 0 hosts the
    rendezvous there); ``parasync.init()`` reads the launcher's environment instead.
    ``token`` names the job (ranks of another job are refused); ``auth_token`` is the
    secret every rank must present (default: ``PARASYNC_AUTH_TOKEN``, or the file
    ``PARASYNC_AUTH_TOKEN_FILE`` names; none: no authentication).
    """

    def __init__(
        self, rank: int, size: int, master: str, timeout: float = 60.0, token: str | None = None, auth_token: str | None = None
    ) -> None:
        self._c = _native.Communicator(rank, size, master, timeout, token, auth_token)

    @classmethod
    def from_env(cls, timeout: float = 60.0) -> "Communicator":
        """The job the launcher describes (torchrun, ``TF_CONFIG``, Slurm)."""
        self = cls.__new__(cls)
        self._c = _native.Communicator.from_env(timeout)
        return self

    @property
    def rank(self) -> int:
        return self._c.rank

    @property
    def size(self) -> int:
        return self._c.size

    def allreduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduces ``array`` over every rank in place (op: sum, avg, min, max); returns it."""
        return self._c.allreduce(array, op)

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """Copies ``root``'s ``array`` into every rank's in place; returns it."""
        return self._c.broadcast(array, root)

    def allgather(self, send: np.ndarray, recv: np.ndarray) -> np.ndarray:
        """Every rank's ``send`` into ``recv`` (``size × send.size`` elements, rank order)."""
        return self._c.allgather(send, recv)

    def reduce_scatter(self, send: np.ndarray, recv: np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduces ``send`` (``size × recv.size`` elements); ``recv`` gets this rank's block."""
        return self._c.reduce_scatter(send, recv, op)

    def barrier(self) -> None:
        """Returns once every rank has called it."""
        self._c.barrier()

    def allreduce_async(self, array: np.ndarray, op: str = "sum") -> Work:
        return self._c.allreduce_async(array, op)

    def broadcast_async(self, array: np.ndarray, root: int = 0) -> Work:
        return self._c.broadcast_async(array, root)

    def allgather_async(self, send: np.ndarray, recv: np.ndarray) -> Work:
        return self._c.allgather_async(send, recv)

    def reduce_scatter_async(self, send: np.ndarray, recv: np.ndarray, op: str = "sum") -> Work:
        return self._c.reduce_scatter_async(send, recv, op)

    def barrier_async(self) -> Work:
        return self._c.barrier_async()

    @property
    def pending(self) -> int:
        """Started operations not finished yet."""
        return self._c.pending

    def close(self) -> None:
        """Waits for started operations, then closes the connections. Idempotent."""
        self._c.close()

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<parasync.Communicator rank {self.rank} of {self.size}>"


def init(timeout: float = 60.0) -> Communicator:
    """A communicator for this process, from the launcher's environment: torchrun's
    ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``, ``TF_CONFIG``, or Slurm's
    ``SLURM_PROCID`` / ``SLURM_NTASKS`` (``python -m parasync.launch`` sets the first)."""
    return Communicator.from_env(timeout)
