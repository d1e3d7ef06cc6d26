"""`ParameterServerOptimizer`: a model's parameters live on `parasync server` shards; each
``step()`` pushes the gradients and pulls the new values into the parameters in place."""

from __future__ import annotations

from typing import Callable, Iterable, Union

import numpy as np
import torch

from .._ps import PsClient, PushSummary
from .._spec import SGD, Adagrad, Adam, AdamW, Adopt, VariableSpec
from ._tensors import check_tensor

ServerOptimizer = Union[SGD, Adagrad, Adam, AdamW]


def _flat_view(t: torch.Tensor, what: str) -> np.ndarray:
    """A float32 numpy array over ``t``'s memory, in the variable's shape (a scalar as (1,))."""
    check_tensor(t, what)
    if t.dtype != torch.float32:
        raise TypeError(
            f"{what} is {t.dtype}: the parameter server takes float32 parameters and gradients "
            "(store them as bf16 on the servers with storage_dtype='bf16')"
        )
    return t.detach().view(_shape(t)).numpy()


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape) if t.dim() > 0 else (1,)


class ParameterServerOptimizer(torch.optim.Optimizer):
    """Trains ``model`` against `parasync server` shards: the optimizer runs on the servers.

    On construction the model's parameters are registered on the shards: the chief's
    (worker 0's) initial values win, every other worker registers without values of its own
    and adopts them; then every worker pulls the values into its parameters. A variable
    that already exists keeps its values (a restarted worker, restored shards), so a worker
    joining a running job starts from where training is. Each ``step()`` pushes every
    parameter's gradient for this worker's step and, in the same round trip, pulls the values
    of the next step into the parameters, in place (no copies, the GIL released while bytes
    move). What a step means is the servers' mode (``parasync server --mode``):

    - ``sync``: the shards average the gradients of the step from every worker (k of n with
      ``--replicas-to-aggregate``), apply them once, and every worker gets the same values;
    - ``async``: each gradient is applied on arrival; the pull returns the newest values;
    - ``bounded``: as async, but a worker more than ``--max-staleness`` steps ahead of the
      slowest waits for it in its pull.

    Args:
        model: a ``torch.nn.Module`` (its trainable parameters, by name) or an iterable of
            ``(name, parameter)``. Parameters are float32, contiguous, on the CPU.
        client: a connected ``parasync.PsClient`` (its ``worker_id`` says which worker this is),
            used by this optimizer alone (registering fixes the client's variables).
        optimizer: the server-side optimizer (``parasync.SGD``, ``Adagrad``, ``Adam``,
            ``AdamW``), or a function ``(name, parameter) -> optimizer`` (say, no weight decay
            on biases).
        storage_dtype: ``"f32"`` or ``"bf16"``: how the servers store the values.
        chief: whether this worker's initial values are the ones registered (default: worker 0).
        start_step: the step this worker starts at (sync mode: the step the job is at).
        prefix: put before every variable name on the servers (several models on one cluster).

    A parameter without a gradient in a step pushes zeros (in sync mode every worker must
    push every step). Buffers (BatchNorm statistics) stay local to each worker.
    ``param_groups[0]["lr"]`` starts at the optimizer's learning rate; when it changes (by
    hand or from a ``torch.optim.lr_scheduler``), the next ``step()`` sets it on every shard.
    """

    def __init__(
        self,
        model: Union[torch.nn.Module, Iterable[tuple[str, torch.nn.Parameter]]],
        client: PsClient,
        optimizer: Union[ServerOptimizer, Callable[[str, torch.nn.Parameter], ServerOptimizer]] = SGD(0.01),
        *,
        storage_dtype: str = "f32",
        chief: bool | None = None,
        start_step: int = 0,
        prefix: str = "",
    ) -> None:
        if not isinstance(client, PsClient):
            raise TypeError(f"client must be a parasync.PsClient, got {type(client).__name__}")
        named = list(model.named_parameters() if isinstance(model, torch.nn.Module) else model)
        named = [(n, p) for n, p in named if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        values = [_flat_view(p, f"parameter {n!r}") for n, p in named]  # checks each one
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        chosen = [optimizer(n, p) if callable(optimizer) else optimizer for n, p in named]
        lr = getattr(chosen[0], "lr", None)
        super().__init__([p for _, p in named], {"lr": lr})

        self.client = client
        self.names = [prefix + n for n, _ in named]
        self.chief = client.worker_id == 0 if chief is None else bool(chief)
        client.register(
            [
                VariableSpec(name, v.shape, opt, init=v if self.chief else Adopt(), dtype=storage_dtype)
                for name, v, opt in zip(self.names, values, chosen)
            ]
        )  # the chief's values are copied here, once
        self._named = named
        self._values = values
        self._zeros: list[np.ndarray | None] = [None] * len(named)
        self._step = start_step
        self._lr_sent = lr
        self.last_push: PushSummary | None = None
        client.pull_into(start_step, self._values)  # everyone adopts the registered values

    @property
    def step_count(self) -> int:
        """The step the next ``step()`` pushes for."""
        return self._step

    def _grads(self) -> list[np.ndarray]:
        out = []
        for i, (n, p) in enumerate(self._named):
            if p.grad is None:
                if self._zeros[i] is None:
                    self._zeros[i] = np.zeros(_shape(p), dtype=np.float32)
                out.append(self._zeros[i])
            else:
                if p.grad.is_sparse:
                    raise TypeError(f"parameter {n!r} has a sparse gradient: not supported")
                out.append(_flat_view(p.grad, f"gradient of {n!r}"))
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Pushes this step's gradients and pulls the next step's values into the parameters.
        Returns the closure's loss, if a closure was given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self.param_groups[0]["lr"]
        if lr != self._lr_sent:
            self.client.set_learning_rate(float(lr))
            self._lr_sent = lr
        self.last_push = self.client.push_pull(self._step, self._grads(), self._values)
        self._step += 1
        return loss

    def pull(self, step: int | None = None) -> None:
        """Pulls the values of ``step`` (default: the next step) into the parameters; sync
        mode waits until that step exists."""
        self.client.pull_into(self._step if step is None else step, self._values)

    @property
    def mode(self) -> str:
        """The servers' consistency mode: ``sync``, ``async`` or ``bounded``."""
        return self.client.shard_info()[0]["mode"]

    def state_dict(self) -> dict:
        """The worker's step; the optimizer's state lives on the servers."""
        return {"step": self._step, "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._step = int(state_dict["step"])
        self.param_groups[0]["lr"] = state_dict["lr"]

    def __repr__(self) -> str:
        return f"<parasync.torch.ParameterServerOptimizer worker {self.client.worker_id}, {len(self.names)} variables, step {self._step}>"
