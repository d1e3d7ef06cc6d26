"""DDP communication hooks: ``ddp_model.register_comm_hook(state, allreduce_hook)`` makes
a ``DistributedDataParallel`` model average its gradient buckets over Parasync.

``state`` is None (the module communicator of ``parasync.torch.init()``), a
``parasync.Communicator``, or a process group of the ``"parasync"`` backend. DDP still needs a ``torch.distributed`` process group for its
own setup (it broadcasts the initial parameters and bucket order over it), e.g. Gloo;
with the hook, gradients no longer go through it.
"""

import queue
import threading
from typing import Any, Optional

import torch
import torch.distributed as dist

from .._comm import Communicator
from ._ops import Average, Handle, _resolve, allreduce_async


def _state_comm(state: Any) -> Any:
    """None (the module communicator), a ``parasync.Communicator``, or a group of the
    ``"parasync"`` backend (its communicator)."""
    comm = getattr(state, "comm", None)
    return _resolve(comm if isinstance(comm, Communicator) else state)


class _Completer:
    """One daemon thread that waits for started collectives in order and completes their
    futures (results, or the operation's exception)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def started(self, handle: Any, finish: Any = None) -> torch.futures.Future:
        """A future for PyTorch's C++ side (DDP's reducer, a Work): it completes with the
        result once ``handle`` is over, or fails with the operation's error, its message
        ("PeerError: ... rank N ...") carried into the RuntimeError PyTorch raises. (A
        Python future failed with ``set_exception`` reaches C++ as a value, not an error.)"""
        fut: torch.futures.Future = torch.futures.Future()
        self.submit(handle, fut, finish)
        return fut.then(_value)

    def submit(self, handle: Handle, fut: torch.futures.Future, finish: Any = None) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="parasync-ddp-hook", daemon=True)
                self._thread.start()
        self._q.put((handle, fut, finish))

    def _run(self) -> None:
        while True:
            handle, fut, finish = self._q.get()
            try:
                result = handle.wait()
                if finish is not None:
                    result = finish()
            except BaseException as e:  # noqa: BLE001  (handed to the waiting side)
                fut.set_exception(e)
            else:
                fut.set_result(result)


def _value(fut: torch.futures.Future) -> Any:
    return fut.wait()  # raises the operation's error inside the callback: the chained future fails


_completer = _Completer()


def _buffer(bucket: Any) -> torch.Tensor:
    return bucket.buffer() if hasattr(bucket, "buffer") else bucket


def allreduce_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Averages the bucket over Parasync's ranks in place; the returned future completes
    (from a background thread) with the averaged bucket tensor, or fails with the
    collective's error (DDP raises it as a RuntimeError whose message starts with the
    ``parasync`` exception's name and names the failed rank)."""
    buf = _buffer(bucket)
    return _completer.started(allreduce_async(buf, Average, comm=_state_comm(state)))


def parasync_bf16_compress_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """As ``allreduce_hook``, sending the bucket as bfloat16 (half the bytes of float32);
    the future completes with the bucket holding the decompressed average. (Named so
    that DDP does not take it for its own ``bf16_compress_hook``, which it refuses
    without CUDA and NCCL; exported as ``bf16_compress_hook`` too.)"""
    buf = _buffer(bucket)
    if buf.dtype == torch.bfloat16:
        return allreduce_hook(state, bucket)
    wire = buf.to(torch.bfloat16)
    handle = allreduce_async(wire, Average, comm=_state_comm(state))

    def finish() -> torch.Tensor:
        buf.copy_(wire)
        return buf

    return _completer.started(handle, finish)


bf16_compress_hook = parasync_bf16_compress_hook
