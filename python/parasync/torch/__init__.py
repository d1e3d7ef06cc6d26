"""PyTorch on Parasync: data parallel training in a few lines, Horovod style or as a DDP
communication hook.

Horovod style (start with ``python -m parasync.launch -n 4 train.py`` or torchrun)::

    import parasync.torch as pst
    pst.init()
    model = Net(); optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * pst.size())
    optimizer = pst.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    pst.broadcast_parameters(model.state_dict(), root_rank=0)
    pst.broadcast_optimizer_state(optimizer, root_rank=0)
    # ... the usual loop: zero_grad(), loss.backward(), optimizer.step()

DDP with a comm hook (DDP still needs a process group, e.g. Gloo, for its setup)::

    pst.init()
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, pst.allreduce_hook)   # or pst.bf16_compress_hook

or plain DDP over the ``"parasync"`` ``torch.distributed`` backend this module registers::

    dist.init_process_group("parasync")
    ddp = DistributedDataParallel(model)

Parameter-server mode (the optimizer runs on ``parasync server`` shards; sync, async or
bounded as the servers were started)::

    client = parasync.PsClient(["ps0:7070", "ps1:7070"], worker_id=rank)   # or TF_CONFIG
    optimizer = pst.ParameterServerOptimizer(model, client, parasync.SGD(0.1))
    # ... the usual loop: zero_grad(), loss.backward(), optimizer.step()

Tensors are used in place, never copied: they must be contiguous CPU tensors (float32,
float64, int32, int64 or bfloat16 for reductions; any dtype for broadcasts). A
non-contiguous tensor raises ``ValueError``, a CUDA tensor ``ValueError`` (this package has
no NCCL backend), an unsupported dtype ``TypeError``. A rank that dies or stops answering
makes the others raise ``parasync.PeerError`` naming it within ``init``'s timeout.
"""

try:
    import torch as _torch  # noqa: F401
except ImportError as e:  # pragma: no cover
    raise ImportError("parasync.torch needs PyTorch: pip install -r python/requirements-torch.txt (torch>=2.4)") from e

from ._ddp import allreduce_hook, bf16_compress_hook, parasync_bf16_compress_hook
from ._ops import (
    Average,
    Handle,
    Max,
    Min,
    Sum,
    allgather,
    allreduce,
    allreduce_async,
    barrier,
    broadcast,
    broadcast_async,
    broadcast_object,
    broadcast_optimizer_state,
    broadcast_parameters,
    communicator,
    init,
    is_initialized,
    local_rank,
    poll,
    rank,
    shutdown,
    size,
    synchronize,
)
from ._optimizer import DEFAULT_BUCKET_BYTES, DistributedOptimizer
from ._ps import ParameterServerOptimizer

import torch.distributed as _dist

if _dist.is_available():
    from ._backend import ParasyncProcessGroup, register as register_backend

    register_backend()  # dist.init_process_group("parasync") / dist.new_group(backend="parasync")

__all__ = [
    "init",
    "is_initialized",
    "shutdown",
    "communicator",
    "rank",
    "size",
    "local_rank",
    "Sum",
    "Average",
    "Min",
    "Max",
    "Handle",
    "allreduce",
    "allreduce_async",
    "broadcast",
    "broadcast_async",
    "allgather",
    "barrier",
    "synchronize",
    "poll",
    "broadcast_parameters",
    "broadcast_object",
    "broadcast_optimizer_state",
    "DistributedOptimizer",
    "DEFAULT_BUCKET_BYTES",
    "ParameterServerOptimizer",
    "allreduce_hook",
    "bf16_compress_hook",
    "parasync_bf16_compress_hook",
    "ParasyncProcessGroup",
    "register_backend",
]
