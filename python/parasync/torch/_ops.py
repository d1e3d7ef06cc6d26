"""Horovod-style collectives on tensors in place, over one module-level communicator."""

from __future__ import annotations

import io
import threading
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .._comm import Communicator
from ._tensors import as_array, as_bytes_array, check_tensor

Sum = "sum"
Average = "avg"
Min = "min"
Max = "max"
_OPS = {"sum": "sum", "avg": "avg", "average": "avg", "mean": "avg", "min": "min", "max": "max"}

_lock = threading.Lock()
_comm: Communicator | None = None


def init(timeout: float = 60.0, comm: Communicator | None = None) -> Communicator:
    """Joins the job the launcher describes (``python -m parasync.launch``, torchrun, Slurm):
    one communicator for this process, used by every function of ``parasync.torch``.
    Idempotent: later calls return the same communicator. ``comm`` installs one made by
    the caller instead. ``timeout`` bounds the rendezvous and every operation: a rank that
    dies or stops answering makes the others raise ``parasync.PeerError`` within it."""
    global _comm
    with _lock:
        if _comm is None:
            _comm = comm if comm is not None else Communicator.from_env(timeout)
        elif comm is not None and comm is not _comm:
            raise ValueError("parasync.torch is already initialised with another communicator; call shutdown() first")
        return _comm


def is_initialized() -> bool:
    return _comm is not None


def shutdown() -> None:
    """Closes the module communicator (after its started operations). ``init()`` may be
    called again afterwards."""
    global _comm
    with _lock:
        c, _comm = _comm, None
    if c is not None:
        c.close()


def communicator() -> Communicator:
    """The module communicator; raises if ``init()`` was not called."""
    c = _comm
    if c is None:
        raise ValueError("parasync.torch is not initialised: call parasync.torch.init() first")
    return c


def _resolve(comm: Any) -> Any:
    """``comm`` (a ``parasync.Communicator`` or anything with its methods), else the module one."""
    return communicator() if comm is None else comm


def rank() -> int:
    return communicator().rank


def size() -> int:
    return communicator().size


def local_rank() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank())))


def _op(op: str) -> str:
    try:
        return _OPS[op.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f'unknown reduce op {op!r} (sum, avg, min, max)') from None


class Handle:
    """A started collective on a tensor. ``wait()`` returns the tensor once the operation is
    over (raising its error, e.g. ``parasync.PeerError``); the tensor must not be touched
    until then."""

    __slots__ = ("_work", "tensor", "_finish", "_keep", "_finished")

    def __init__(self, work: Any, tensor: torch.Tensor, finish: Callable[[], None] | None = None, keep: Any = None) -> None:
        self._work = work
        self.tensor = tensor
        self._finish = finish
        self._keep = keep  # buffers the native side reads or writes
        self._finished = False

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        if not self._finished:
            self._work.wait(timeout)
            if self._finish is not None:
                self._finish()
            self._finished = True
            self._keep = None
        return self.tensor

    def done(self) -> bool:
        return self._finished or self._work.done()

    def __repr__(self) -> str:
        return f"<parasync.torch.Handle {'done' if self.done() else 'running'} {tuple(self.tensor.shape)} {self.tensor.dtype}>"


def synchronize(handle: Handle, timeout: float | None = None) -> torch.Tensor:
    """Waits for ``handle``; returns its tensor."""
    return handle.wait(timeout)


def poll(handle: Handle) -> bool:
    """True once ``handle``'s operation is over."""
    return handle.done()


def allreduce_async(tensor: torch.Tensor, op: str = Average, *, comm: Any = None) -> Handle:
    """Starts reducing ``tensor`` over every rank in place; returns a ``Handle``."""
    arr, op = as_array(tensor), _op(op)  # the caller's mistakes first
    work = _resolve(comm).allreduce_async(arr, op)
    return Handle(work, tensor, keep=arr)


def allreduce(tensor: torch.Tensor, op: str = Average, *, comm: Any = None) -> torch.Tensor:
    """Reduces ``tensor`` (a contiguous CPU tensor) over every rank in place (op: ``"avg"``
    (default), ``"sum"``, ``"min"``, ``"max"``); returns it."""
    arr, op = as_array(tensor), _op(op)
    _resolve(comm).allreduce(arr, op)
    return tensor


def _broadcast_start(c: Any, tensor: torch.Tensor, root_rank: int, what: str = "tensor") -> Handle:
    arr = as_bytes_array(tensor, what)
    if arr is not None:
        return Handle(c.broadcast_async(arr, root_rank), tensor, keep=arr)
    # An odd number of bytes: through a padded buffer (not a hot path: small byte tensors).
    raw = tensor.detach().view(-1).view(torch.uint8)
    pad = torch.zeros((raw.numel() + 7) // 8 * 8, dtype=torch.uint8)
    pad[: raw.numel()].copy_(raw)
    buf = pad.numpy().view(np.int64)

    def finish() -> None:
        raw.copy_(pad[: raw.numel()])

    return Handle(c.broadcast_async(buf, root_rank), tensor, finish, keep=buf)


def broadcast_async(tensor: torch.Tensor, root_rank: int = 0, *, comm: Any = None) -> Handle:
    """Starts copying ``root_rank``'s ``tensor`` into every rank's (any dtype); returns a ``Handle``."""
    check_tensor(tensor)
    return _broadcast_start(_resolve(comm), tensor, root_rank)


def broadcast(tensor: torch.Tensor, root_rank: int = 0, *, comm: Any = None) -> torch.Tensor:
    """Copies ``root_rank``'s ``tensor`` into every rank's, in place (any dtype); returns it."""
    check_tensor(tensor)
    return _broadcast_start(_resolve(comm), tensor, root_rank).wait()


def allgather(tensor: torch.Tensor, *, comm: Any = None) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape everywhere) stacked along a new first dimension,
    in rank order."""
    send = as_array(tensor)
    c = _resolve(comm)
    out = torch.empty((c.size, *tensor.shape), dtype=tensor.dtype)
    c.allgather(send, as_array(out, "output"))
    return out


def barrier(*, comm: Any = None) -> None:
    _resolve(comm).barrier()


def _named_tensors(params: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, Mapping):
        items = sorted(params.items(), key=lambda kv: str(kv[0]))
    else:
        items = []
        for i, p in enumerate(params):
            if isinstance(p, tuple) and len(p) == 2:
                items.append((str(p[0]), p[1]))
            else:
                items.append((f"#{i}", p))
    return items


def broadcast_parameters(params: Mapping[str, torch.Tensor] | Iterable[Any], root_rank: int = 0, *, comm: Any = None) -> None:
    """Copies ``root_rank``'s tensors into every rank's, in place: ``params`` is a
    ``state_dict()`` (sorted by name, as Horovod does), ``named_parameters()``, or an
    iterable of tensors; every rank passes the same structure. Every tensor is checked
    before anything is sent."""
    items = _named_tensors(params)
    for name, t in items:
        check_tensor(t, f"parameter {name!r}")
    c = _resolve(comm)
    handles = [_broadcast_start(c, t, root_rank, f"parameter {name!r}") for name, t in items]
    first_error: BaseException | None = None
    for h in handles:
        try:
            h.wait()
        except BaseException as e:  # wait for the others before raising
            first_error = first_error or e
    if first_error is not None:
        raise first_error


def broadcast_object(obj: Any = None, root_rank: int = 0, *, comm: Any = None) -> Any:
    """``root_rank``'s ``obj`` on every rank (pickled with ``torch.save``; its length goes
    first). Other ranks' ``obj`` is ignored. Unpickles what the root sent: use it between
    the ranks of one job only."""
    c = _resolve(comm)
    if c.rank == root_rank:
        buf = io.BytesIO()
        torch.save(obj, buf)
        payload = buf.getvalue()
        length = np.array([len(payload)], np.int64)
    else:
        payload = b""
        length = np.zeros(1, np.int64)
    c.broadcast(length, root_rank)
    n = int(length[0])
    data = np.zeros((n + 7) // 8, np.int64)
    if c.rank == root_rank:
        data.view(np.uint8)[:n] = np.frombuffer(payload, np.uint8)
    c.broadcast(data, root_rank)
    if c.rank == root_rank:
        return obj
    return torch.load(io.BytesIO(data.view(np.uint8)[:n].tobytes()), weights_only=False)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0, *, comm: Any = None) -> None:
    """Every rank's ``optimizer`` ends with ``root_rank``'s state exactly: its per-parameter
    state (also where other ranks have none yet, e.g. Adam before its first step), step
    counters, and the hyper-parameters of every parameter group (``lr``…). The root's
    ``state_dict()`` is broadcast pickled and loaded with ``load_state_dict`` elsewhere,
    so every rank must have the same parameter groups in the same order."""
    c = _resolve(comm)
    state = optimizer.state_dict() if c.rank == root_rank else None
    state = broadcast_object(state, root_rank, comm=c)
    if c.rank != root_rank:
        optimizer.load_state_dict(state)
