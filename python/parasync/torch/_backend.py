"""A ``torch.distributed`` backend named ``"parasync"``, written in Python.

PyTorch (2.4 and later, checked on 2.15) accepts a backend whose creator function returns
a ``torch.distributed.ProcessGroup`` subclass implemented in Python (its virtual methods
are overridable through pybind's trampoline; ``torch.distributed`` uses the instance as
the group itself, as its own test-only ``"threaded"`` backend does). So, after
``import parasync.torch``::

    dist.init_process_group("parasync")       # or dist.new_group(backend="parasync")
    model = DistributedDataParallel(model)   # its allreduces and broadcasts go over Parasync

Supported on contiguous CPU tensors: ``all_reduce`` (sum, avg, min, max), ``broadcast``,
``all_gather`` / ``all_gather_into_tensor``, ``reduce_scatter`` / ``reduce_scatter_tensor``,
``barrier``; other operations raise ``NotImplementedError``. Operations run on the
communicator's thread; their ``Work`` completes from a background thread (``async_op``
works, and DDP overlaps its bucket allreduces with the backward pass). Each group gets its
own ``parasync.Communicator``: rank 0 picks a port (next to ``MASTER_ADDR``, else this
host's name) and a job token and hands them to the others through the group's store. The
group's ``timeout`` (``init_process_group(timeout=...)``) is Parasync's: a rank that dies
makes the others fail within it.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (
    AllgatherOptions,
    AllreduceCoalescedOptions,
    AllreduceOptions,
    BarrierOptions,
    BroadcastOptions,
    ReduceScatterOptions,
    _create_work_from_future,
)

from .._comm import Communicator
from ._ddp import _completer
from ._ops import Handle, _broadcast_start
from ._tensors import as_array

NAME = "parasync"
_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
}


def _op(opts: Any) -> str:
    kind = opts.reduceOp.op
    try:
        return _OPS[kind]
    except KeyError:
        raise ValueError(f"parasync backend: reduce op {kind} is not supported (SUM, AVG, MIN, MAX)") from None


class _Multi:
    """Several started operations awaited as one."""

    def __init__(self, handles: list[Handle]) -> None:
        self.handles = handles

    def wait(self, timeout: float | None = None) -> None:
        error: BaseException | None = None
        for h in self.handles:
            try:
                h.wait(timeout)
            except BaseException as e:  # noqa: BLE001  (wait for the others, raise the first)
                error = error or e
        if error is not None:
            raise error

    def done(self) -> bool:
        return all(h.done() for h in self.handles)


def _work(started: Any, result: Any, finish: Callable[[], None] | None = None) -> Any:
    """A ``torch.distributed`` Work whose future completes with ``result`` once ``started``
    (a Handle or _Multi) is over and ``finish`` has run."""

    def complete() -> Any:
        if finish is not None:
            finish()
        return result

    return _create_work_from_future(_completer.started(started, complete))


class ParasyncProcessGroup(dist.ProcessGroup):
    """A ``torch.distributed`` process group over a ``parasync.Communicator``."""

    def __init__(self, comm: Communicator) -> None:
        super().__init__(comm.rank, comm.size)
        self.comm = comm

    def getBackendName(self) -> str:  # noqa: N802  (torch's name)
        return NAME

    def __repr__(self) -> str:
        return f"<ParasyncProcessGroup rank {self.comm.rank} of {self.comm.size}>"

    # -- reductions ----------------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        op = _op(opts or AllreduceOptions())
        arrays = [as_array(t) for t in tensors]  # check all before starting any
        handles = [Handle(self.comm.allreduce_async(a, op), t, keep=a) for a, t in zip(arrays, tensors)]
        return _work(_Multi(handles), tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        o = AllreduceOptions()
        o.reduceOp = (opts or AllreduceCoalescedOptions()).reduceOp
        return self.allreduce(tensors, o)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:  # noqa: A002
        op = _op(opts or ReduceScatterOptions())
        send, recv = as_array(input, "input"), as_array(output, "output")
        h = Handle(self.comm.reduce_scatter_async(send, recv, op), output, keep=(send, recv))
        return _work(h, [output])

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:  # noqa: A002
        return self.reduce_scatter_single(output, input, opts)

    def reduce_scatter(self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any = None) -> Any:
        op = _op(opts or ReduceScatterOptions())
        handles = []
        for out, ins in zip(outputs, input_lists):
            for i in ins:
                if i.numel() != out.numel():
                    raise ValueError("parasync backend: reduce_scatter inputs must each have the output's size")
            send = torch.cat([i.reshape(-1) for i in ins])  # the list form needs one flat send buffer
            a, b = as_array(send, "input"), as_array(out, "output")
            handles.append(Handle(self.comm.reduce_scatter_async(a, b, op), out, keep=(send, a, b)))
        return _work(_Multi(handles), outputs)

    # -- copies --------------------------------------------------------------------------

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        root = (opts or BroadcastOptions()).rootRank
        handles = [_broadcast_start(self.comm, t, root) for t in tensors]
        return _work(_Multi(handles), tensors)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:  # noqa: A002
        send, recv = as_array(input, "input"), as_array(output, "output")
        h = Handle(self.comm.allgather_async(send, recv), output, keep=(send, recv))
        return _work(h, [output])

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:  # noqa: A002
        return self.all_gather_single(output, input, opts)

    def allgather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> Any:
        handles, copies = [], []
        for outs, inp in zip(output_lists, inputs):
            if len(outs) != self.comm.size or any(o.numel() != inp.numel() or o.dtype != inp.dtype for o in outs):
                raise ValueError("parasync backend: all_gather needs world-size outputs shaped like the input")
            recv = torch.empty(self.comm.size * inp.numel(), dtype=inp.dtype)  # the list form needs one flat buffer
            a, b = as_array(inp, "input"), as_array(recv, "output")
            handles.append(Handle(self.comm.allgather_async(a, b), recv, keep=(a, b)))
            copies.append((outs, recv, inp.numel()))

        def finish() -> None:
            for outs, recv, n in copies:
                for r, o in enumerate(outs):
                    o.copy_(recv[r * n : (r + 1) * n].view_as(o))

        return _work(_Multi(handles), output_lists, finish)

    def barrier(self, opts: Any = None) -> Any:
        empty = torch.empty(0)
        return _work(Handle(self.comm.barrier_async(), empty), [empty])

    # -- not supported -------------------------------------------------------------------

    def _unsupported(self, name: str) -> Any:
        raise NotImplementedError(
            f"the parasync backend does not implement {name} (it has all_reduce, broadcast, all_gather, "
            "reduce_scatter and barrier); use another group, e.g. dist.new_group(backend='gloo'), for it"
        )

    def send(self, *a: Any, **k: Any) -> Any:
        return self._unsupported("send")

    def recv(self, *a: Any, **k: Any) -> Any:
        return self._unsupported("recv")

    def recv_anysource(self, *a: Any, **k: Any) -> Any:
        return self._unsupported("recv")

    def reduce(self, *a: Any, **k: Any) -> Any:
        return self._unsupported("reduce")

    def gather(self, *a: Any, **k: Any) -> Any:
        return self._unsupported("gather")

    def scatter(self, *a: Any, **k: Any) -> Any:
        return self._unsupported("scatter")

    def alltoall(self, *a: Any, **k: Any) -> Any:
        return self._unsupported("all_to_all")

    def alltoall_base(self, *a: Any, **k: Any) -> Any:
        return self._unsupported("all_to_all_single")

    def all_to_all_single(self, *a: Any, **k: Any) -> Any:
        return self._unsupported("all_to_all_single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _create(store: Any, rank: int, size: int, timeout: timedelta) -> ParasyncProcessGroup:
    """The creator ``torch.distributed`` calls for each group: rank 0 publishes a rendezvous
    address and a job token through the group's store."""
    seconds = timeout.total_seconds()
    if rank == 0:
        host = os.environ.get("PARASYNC_BACKEND_ADDR") or os.environ.get("MASTER_ADDR") or socket.getfqdn()
        master = f"{host}:{_free_port()}"
        token = secrets.token_hex(16)
        store.set("parasync/master", master)
        store.set("parasync/token", token)
    else:
        store.wait(["parasync/master", "parasync/token"], timeout)
        master = store.get("parasync/master").decode()
        token = store.get("parasync/token").decode()
    return ParasyncProcessGroup(Communicator(rank, size, master, timeout=seconds, token=token))


def register() -> None:
    """Registers the ``"parasync"`` backend with ``torch.distributed`` (idempotent; done
    when ``parasync.torch`` is imported). It does not become the default for CPU tensors."""
    if not dist.is_available() or NAME in dist.Backend.backend_list:
        return
    dist.Backend.register_backend(NAME, _create, devices=["cpu"])
