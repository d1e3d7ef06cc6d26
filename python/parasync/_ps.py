"""`PsClient`: a trainer's connection to the parameter-server shards."""

from __future__ import annotations

import os
from typing import Mapping, Sequence, Union

import numpy as np

from . import _native
from ._native import PushSummary, SparsePushSummary
from ._spec import TableSpec, VariableSpec

Arrays = Union[Mapping[str, np.ndarray], Sequence[np.ndarray]]


class PsClient:
    """Connects to every shard of a parameter-server job.

    ``addresses`` default to ``TF_CONFIG``'s ``cluster.ps``. Arrays are float32 and
    C-contiguous; they are read and written in place (nothing is copied), and any other
    array raises ``TypeError`` / ``ValueError`` naming the variable before anything is sent.
    The GIL is released while bytes move, so several threads may call one client at once;
    Ctrl-C interrupts a blocked call.

    Args:
        addresses: ``host:port`` of each shard, in shard order.
        worker_id: this worker's id, ``0..num_workers`` (the order sync mode sums in).
        wire_dtype: element type of pushed gradients on the wire (``"f32"`` or ``"bf16"``).
        pull_wire_dtype: element type of pulled values on the wire (default: ``wire_dtype``).
        timeout: seconds to keep retrying while the shards start.
        pull_timeout: seconds the server may hold a pull waiting for its step.
        data_plane: move tensors over the shards' plain-TCP data plane (else gRPC).
        reply_spin: seconds to busy-poll for small replies (lower latency, one busy core).
        recovery_timeout: seconds a push, pull or push_pull keeps waiting for a shard that
            went away (a restart from its checkpoint is picked up; in sync mode the worker
            re-pushes the steps the restored shard lacks); 0 fails at once.
        auth_token: the secret the shards require (their ``--auth-token-file``); default:
            ``PARASYNC_AUTH_TOKEN``, or the file ``PARASYNC_AUTH_TOKEN_FILE`` names.
        tls_ca: PEM file of the authority the shards' certificates chain to: talk TLS to
            shards started with ``--tls-cert`` (default: ``PARASYNC_TLS_CA``, else plain TCP).
        tls_cert, tls_key: this client's certificate and key, for shards that require one
            (``--tls-client-ca``).
        tls_domain: the name the shards' certificates carry, when it is not the host dialled.
    """

    def __init__(
        self,
        addresses: Sequence[str] | None = None,
        worker_id: int = 0,
        wire_dtype: str = "f32",
        pull_wire_dtype: str | None = None,
        timeout: float = 30.0,
        pull_timeout: float | None = None,
        data_plane: bool = True,
        reply_spin: float = 0.0,
        split_bytes: int | None = None,
        chunk_bytes: int | None = None,
        recovery_timeout: float = 60.0,
        auth_token: str | None = None,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        tls_domain: str | None = None,
    ) -> None:
        if addresses is None:
            addresses = _native.ps_addresses_from_env()
            if addresses is None:
                raise ValueError("no parameter-server addresses: pass addresses=[...] or set TF_CONFIG with cluster.ps")
        if isinstance(addresses, str):
            addresses = [addresses]
        self._c = _native.PsClient(
            list(addresses),
            worker_id,
            wire_dtype,
            pull_wire_dtype,
            timeout,
            pull_timeout,
            data_plane,
            reply_spin,
            split_bytes,
            chunk_bytes,
            recovery_timeout,
            auth_token,
            None if tls_ca is None else os.fspath(tls_ca),
            None if tls_cert is None else os.fspath(tls_cert),
            None if tls_key is None else os.fspath(tls_key),
            tls_domain,
        )
        self._shapes: dict[str, tuple[int, ...]] = {}

    # -- model --------------------------------------------------------------------------

    def register(self, specs: Sequence[VariableSpec]) -> None:
        """Registers the variables on their shards. Idempotent: every worker may register
        the same specs; the first registration initialises. Fixes the variable order."""
        specs = list(specs)
        for s in specs:
            if not isinstance(s, VariableSpec):
                raise TypeError(f"register() takes parasync.VariableSpec objects, got {type(s).__name__}")
        self._c.register([s._native() for s in specs])
        self._shapes = {name: tuple(shape) for name, shape in self._c.variables()}

    @property
    def variables(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every registered variable, in registration order."""
        return dict(self._shapes)

    # -- per step -----------------------------------------------------------------------

    def empty(self) -> dict[str, np.ndarray]:
        """New float32 arrays, one per variable, for ``pull_into`` / ``push_pull``."""
        if self.closed:
            raise ValueError("the client is closed")
        if not self._shapes:
            raise ValueError("register the model before pulling or pushing")
        return {name: np.empty(shape, dtype=np.float32) for name, shape in self._shapes.items()}

    def pull(self, step: int) -> dict[str, np.ndarray]:
        """The values of every variable for ``step`` (sync: waits until the step exists)."""
        out = self.empty()
        self._c.pull_into(step, out)
        return out

    def pull_into(self, step: int, arrays: Arrays) -> None:
        """Like ``pull``, into the caller's arrays (a dict by name, or a list in
        registration order), written in place."""
        self._c.pull_into(step, arrays)

    def push(self, step: int, grads: Arrays) -> PushSummary:
        """Pushes one gradient per variable for ``step``. Returns a ``PushSummary``: parts
        applied or accepted for their sync step (``accepted``), parts dropped as late
        gradients (``dropped_stale``), the staleness of each applied async part (``staleness``),
        parts sent again after a broken connection or a shard's restart (``retried``), retries
        an earlier attempt had applied (``duplicate``), and per part ``(variable, part, shard,
        applied, attempts, duplicate)`` (``parts``)."""
        return self._c.push(step, grads)

    def push_pull(self, step: int, grads: Arrays, out: Arrays) -> PushSummary:
        """Pushes the gradients of ``step`` and receives the values of ``step + 1`` into
        ``out`` in the same round trip. If the push is accepted but the pull fails, the
        error says so: do not push the same gradient again."""
        return self._c.push_pull(step, grads, out)

    # -- sparse tables ------------------------------------------------------------------

    def register_table(self, spec: TableSpec) -> None:
        """Creates a sparse table on every shard. Idempotent: every worker may register the
        same spec; a different spec under the same name raises ``PsAlreadyExistsError``."""
        if not isinstance(spec, TableSpec):
            raise TypeError(f"register_table() takes a parasync.TableSpec, got {type(spec).__name__}")
        self._c.register_table(spec._native())

    def lookup(self, table: str, ids: np.ndarray, step: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """The rows of ``ids`` in ``table``: a float32 array of shape ``(len(ids), dim)``,
        one row per id in order (a repeated id gets its row at each place).

        ``ids`` is a 1-D C-contiguous array of uint64; an int64 array is accepted when no id
        is negative, and read as uint64 in place. ``out``, if given, is a C-contiguous,
        writable float32 array of shape ``(len(ids), dim)``: it is filled in place and
        returned. A table this client did not register is looked up on the shards once (its
        row width); ``PsNotFoundError`` when it does not exist. In sync mode a lookup for
        ``step`` waits until the step exists."""
        return self._c.lookup(table, ids, step, out)

    def push_sparse(self, table: str, ids: np.ndarray, grads: np.ndarray, step: int = 0) -> SparsePushSummary:
        """Pushes one gradient row per id (``grads``: C-contiguous float32 of shape
        ``(len(ids), dim)``, or flat) for ``step``. Rows of repeated ids are summed (in the
        order they appear) and each shard gets its ids in one request; the table's optimizer
        updates only those rows. Returns a ``SparsePushSummary``: shards that applied or
        accepted their rows (``accepted``), shards that dropped them as late (``dropped_stale``),
        the staleness of each applied part (``staleness``) and the distinct ids sent
        (``unique_ids``)."""
        return self._c.push_sparse(table, ids, grads, step)

    # -- shards -------------------------------------------------------------------------

    def set_learning_rate(self, lr: float) -> None:
        """Sets the learning rate of every variable on every shard."""
        self._c.set_learning_rate(lr)

    def shard_info(self) -> list[dict]:
        """Each shard's address, mode, number of workers, dropped gradients, variables,
        the step of the checkpoint it was restored from (``restored_step``, or None), and
        its sparse tables (``tables``: one dict per table with ``name``, ``dim``,
        ``version``, ``rows`` held, ``admitted``, ``evicted``, ``dropped`` updates of ids
        without a row, ``rows_looked_up``, ``rows_pushed``)."""
        return self._c.shard_info()

    def checkpoint(self, step: int) -> list[dict]:
        """Has every shard write a checkpoint of ``step`` and returns once all are on
        disk: one dict per shard (``shard``, ``step``, ``path``, ``bytes``, ``seconds``).

        In sync mode call it from one worker (the chief) with the step it is about to
        push: every variable is saved exactly as that step left it. In async and bounded
        mode each shard saves its variables as they are. The shards must run with
        ``--checkpoint-dir``; ``parasync checkpoint export`` joins the files into one
        safetensors file of whole tensors."""
        return self._c.checkpoint(step)

    @property
    def num_shards(self) -> int:
        return self._c.num_shards

    @property
    def worker_id(self) -> int:
        return self._c.worker_id

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Closes the connections. Idempotent."""
        self._c.close()

    @property
    def closed(self) -> bool:
        return self._c.closed

    def __enter__(self) -> "PsClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.num_shards} shards"
        return f"<parasync.PsClient worker {self.worker_id if not self.closed else '?'}, {state}>"
