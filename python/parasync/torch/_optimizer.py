"""`DistributedOptimizer`: gradients averaged over the ranks in fused buckets, started
during the backward pass and awaited in ``step()``."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ._ops import Average, Handle, _resolve, allreduce_async

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024
_FLOATS = (torch.float32, torch.float64, torch.bfloat16)


class _Bucket:
    """Consecutive parameters of one dtype, packed into one flat tensor: their gradients
    first, then one presence flag per parameter (1 where this rank had a gradient; after
    averaging, 0 only where no rank had one: those keep ``grad = None``)."""

    def __init__(self, index: int, params: list[tuple[str, torch.nn.Parameter]], compression: str | None) -> None:
        self.index = index
        self.params = params
        self.dtype = params[0][1].dtype
        self.offsets = []
        n = 0
        for _, p in params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        self.flat = torch.zeros(n + len(params), dtype=self.dtype)
        self.flags = self.flat[n:]
        self.wire = torch.zeros(self.flat.numel(), dtype=torch.bfloat16) if compression == "bf16" and self.dtype != torch.bfloat16 else None
        self.packed = [False] * len(params)
        self.missing = len(params)
        self.handle: Handle | None = None

    def reset(self) -> None:
        self.packed = [False] * len(self.params)
        self.missing = len(self.params)
        self.handle = None

    def slot(self, i: int) -> torch.Tensor:
        p = self.params[i][1]
        o = self.offsets[i]
        return self.flat[o : o + p.numel()].view_as(p)

    def pack(self, i: int) -> None:
        """Copies parameter ``i``'s gradient in (zeros and flag 0 where it has none)."""
        p = self.params[i][1]
        if p.grad is not None:
            if p.grad.is_sparse:
                raise TypeError(f"parameter {self.params[i][0]!r} has a sparse gradient: not supported")
            self.slot(i).copy_(p.grad)
            self.flags[i] = 1
        else:
            self.slot(i).zero_()
            self.flags[i] = 0
        self.packed[i] = True
        self.missing -= 1

    def start(self, comm: Any) -> None:
        if self.wire is not None:
            self.wire.copy_(self.flat)
            h = allreduce_async(self.wire, Average, comm=comm)
            flat, wire = self.flat, self.wire
            self.handle = Handle(h, flat, lambda: flat.copy_(wire))  # waits for h, then decompresses
        else:
            self.handle = allreduce_async(self.flat, Average, comm=comm)

    def finish(self) -> None:
        """Waits, then writes the averages into ``.grad``."""
        assert self.handle is not None
        self.handle.wait()
        flags = self.flags.tolist()
        for i, (_, p) in enumerate(self.params):
            if flags[i] == 0.0:
                continue  # no rank had a gradient: leave it as it is (None)
            if p.grad is None:
                p.grad = self.slot(i).clone()
            else:
                p.grad.copy_(self.slot(i))


class _DistributedOptimizerMixin:
    """Methods of the class ``DistributedOptimizer`` makes (before the wrapped optimizer's
    class in the MRO, so ``super().step()`` is the wrapped optimizer's step)."""

    def _ps_setup(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None,
        backward_passes_per_step: int,
        compression: str | None,
        bucket_bytes: int,
        comm: Any,
    ) -> None:
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be at least 1")
        if compression not in (None, "none", "bf16"):
            raise ValueError(f"unknown compression {compression!r} (None or 'bf16')")
        if compression == "none":
            compression = None
        if bucket_bytes <= 0:
            raise ValueError("bucket_bytes must be positive")
        self._ps_comm = _resolve(comm)
        in_groups = [p for g in self.param_groups for p in g["params"]]
        if named_parameters is not None:
            named = [(str(n), p) for n, p in named_parameters]
            names = [n for n, _ in named]
            if len(set(names)) != len(names):
                raise ValueError("named_parameters has duplicate names")
            known = {id(p) for _, p in named}
            unnamed = [i for i, p in enumerate(in_groups) if id(p) not in known]
            if unnamed:
                raise ValueError(f"named_parameters does not name {len(unnamed)} of the optimizer's parameters")
            in_optimizer = {id(p) for p in in_groups}
            named = [(n, p) for n, p in named if id(p) in in_optimizer]
        else:
            named = [(f"param.{i}", p) for i, p in enumerate(in_groups)]
        seen: set[int] = set()
        params = []
        for n, p in named:
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if p.device.type != "cpu":
                raise ValueError(
                    f"parameter {n!r} is on {p.device}: parasync.torch works on CPU tensors only "
                    "(the Python package is built without the NCCL backend)"
                )
            if p.dtype not in _FLOATS:
                raise TypeError(f"parameter {n!r}: dtype {p.dtype} is not supported (float32, float64, bfloat16)")
            params.append((n, p))
        # Buckets in reverse parameter order (the backward pass produces the last layers'
        # gradients first), split at bucket_bytes and at dtype changes; identical on every
        # rank because the model is.
        self._ps_buckets: list[_Bucket] = []
        self._ps_where: dict[int, tuple[int, int]] = {}
        current: list[tuple[str, torch.nn.Parameter]] = []
        nbytes = 0
        for n, p in reversed(params):
            size = p.numel() * p.element_size()
            if current and (current[0][1].dtype != p.dtype or nbytes + size > bucket_bytes):
                self._ps_buckets.append(_Bucket(len(self._ps_buckets), current, compression))
                current, nbytes = [], 0
            current.append((n, p))
            nbytes += size
        if current:
            self._ps_buckets.append(_Bucket(len(self._ps_buckets), current, compression))
        for b in self._ps_buckets:
            for i, (_, p) in enumerate(b.params):
                self._ps_where[id(p)] = (b.index, i)
        self._ps_k = backward_passes_per_step
        self._ps_counts = {id(p): 0 for _, p in params}
        self._ps_next = 0  # the next bucket to start: strictly in order, the same on every rank
        self._ps_hooks = [p.register_post_accumulate_grad_hook(self._ps_hook) for _, p in params]

    # -- during backward -----------------------------------------------------------------

    def _ps_hook(self, p: torch.Tensor) -> None:
        key = id(p)
        self._ps_counts[key] += 1
        count = self._ps_counts[key]
        if count < self._ps_k:
            return
        b, i = self._ps_where[key]
        bucket = self._ps_buckets[b]
        if count > self._ps_k or bucket.packed[i]:
            raise RuntimeError(
                f"the gradient of {bucket.params[i][0]!r} was computed more than backward_passes_per_step="
                f"{self._ps_k} times before step(): call step() (or synchronize()) after every "
                f"{self._ps_k} backward pass(es), or raise backward_passes_per_step"
            )
        bucket.pack(i)
        self._ps_start_ready()

    def _ps_start_ready(self) -> None:
        buckets = self._ps_buckets
        while self._ps_next < len(buckets) and buckets[self._ps_next].missing == 0:
            buckets[self._ps_next].start(self._ps_comm)
            self._ps_next += 1

    # -- in step() -----------------------------------------------------------------------

    def synchronize(self) -> None:
        """Starts the buckets not started yet (parameters without a gradient count as
        zeros), waits for all of them and writes the averaged gradients into ``.grad``."""
        try:
            for b in self._ps_buckets[self._ps_next :]:
                for i, done in enumerate(b.packed):
                    if not done:
                        b.pack(i)
                b.start(self._ps_comm)
            self._ps_next = len(self._ps_buckets)
            error: BaseException | None = None
            for b in self._ps_buckets:
                if b.handle is None:
                    continue
                try:
                    b.finish()
                except BaseException as e:  # wait for the others, raise the first
                    error = error or e
            if error is not None:
                raise error
        finally:
            for b in self._ps_buckets:
                b.reset()
            self._ps_next = 0
            for k in self._ps_counts:
                self._ps_counts[k] = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        if any(self._ps_counts.values()):
            raise RuntimeError(
                "zero_grad() was called after backward() but before step(): the gradients are already being "
                "averaged; call step() or synchronize() first (the same on every rank)"
            )
        super().zero_grad(set_to_none)  # type: ignore[misc]

    def step(self, closure: Any = None) -> Any:
        self.synchronize()
        return super().step(closure)  # type: ignore[misc]

    step.hooked = True  # type: ignore[attr-defined]  # torch's profiling wrapper stays on the wrapped class's step

    def remove_hooks(self) -> None:
        """Unregisters the gradient hooks (the optimizer then no longer averages)."""
        for h in self._ps_hooks:
            h.remove()
        self._ps_hooks = []


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    backward_passes_per_step: int = 1,
    compression: str | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    *,
    comm: Any = None,
) -> torch.optim.Optimizer:
    """Wraps ``optimizer`` so that its gradients are averaged over the ranks.

    Each parameter's gradient is copied into a fused flat bucket (about ``bucket_bytes``,
    parameters in reverse order, identical on every rank) as soon as the backward pass
    has accumulated it; a full bucket starts an ``allreduce_async(bucket, "avg")`` at once,
    so communication overlaps the rest of the backward pass. ``step()`` starts what is
    left (a parameter without a gradient on this rank counts as zeros; one without a
    gradient on any rank keeps ``grad = None``), waits, writes the averages into ``.grad``
    and calls the wrapped optimizer's ``step()``.

    With ``backward_passes_per_step=k`` gradients accumulate locally over k backward passes
    (summed, as in Horovod: scale the loss by 1/k for a mean) and are averaged once.
    ``compression="bf16"`` sends buckets as bfloat16. ``named_parameters`` (default: the
    optimizer's parameters in order) only names them in errors.

    The result is an instance of a subclass of ``optimizer``'s class sharing its state and
    parameter groups (``state_dict``, ``zero_grad``, LR schedulers work as before); use it
    instead of ``optimizer``.
    """
    base = optimizer.__class__
    cls = type(base.__name__, (_DistributedOptimizerMixin, base), {"__module__": base.__module__})
    obj = cls.__new__(cls)
    obj.__dict__.update(optimizer.__dict__)
    obj._ps_setup(named_parameters, backward_passes_per_step, compression, bucket_bytes, comm)
    return obj
