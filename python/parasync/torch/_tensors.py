"""PyTorch tensors as the numpy arrays the native calls take, without copies.

A CPU tensor and ``tensor.detach().view(-1).numpy()`` share memory, so the native call
reduces the tensor in place; bf16 goes through ``tensor.view(torch.int16)`` and
``ml_dtypes.bfloat16``. Anything that cannot be shared that way is refused with a clear
error before anything is sent: a non-contiguous tensor (``ValueError``, never copied
silently), a tensor that is not on the CPU (``ValueError``: the Python package has no
NCCL backend), a sparse tensor or an unsupported dtype (``TypeError``).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

# What the native reductions take (allreduce, reduce_scatter, allgather on values).
REDUCIBLE = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.bfloat16: ml_dtypes.bfloat16,
}
_NAMES = "float32, float64, int32, int64, bfloat16"


def check_tensor(t: object, what: str = "tensor") -> torch.Tensor:
    """Raises unless ``t`` is a dense, contiguous CPU tensor (any dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{what}: {t.layout} tensors are not supported (dense tensors only)")
    if t.device.type != "cpu":
        if t.device.type == "cuda":
            raise ValueError(
                f"{what} is on {t.device}: this parasync Python package works on CPU tensors only "
                "(it is built without the NCCL backend); move it with .cpu() and copy the result back"
            )
        raise ValueError(f"{what} is on device {t.device}: parasync.torch works on CPU tensors only")
    if not t.is_contiguous():
        raise ValueError(
            f"{what} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}): parasync works on "
            "tensors in place and does not copy them; pass a contiguous tensor (t.contiguous()) and copy "
            "the result back"
        )
    if t.is_conj() or t.is_neg():
        raise ValueError(f"{what} has a lazy conjugate/negative bit; call .resolve_conj()/.resolve_neg() first")
    return t


def as_array(t: torch.Tensor, what: str = "tensor") -> np.ndarray:
    """A 1-D numpy array sharing ``t``'s memory, of a dtype the native reductions take."""
    check_tensor(t, what)
    if t.dtype not in REDUCIBLE:
        raise TypeError(f"{what}: dtype {t.dtype} is not supported (supported: {_NAMES})")
    flat = t.detach().view(-1)
    if t.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return flat.numpy()


def as_bytes_array(t: torch.Tensor, what: str = "tensor") -> np.ndarray | None:
    """For byte-wise operations (broadcast): a 1-D numpy array over ``t``'s memory whatever
    its dtype, or None when its size or alignment admits no such view (an odd number of
    bytes): the caller then goes through a padded buffer."""
    check_tensor(t, what)
    if t.dtype in REDUCIBLE:
        return as_array(t, what)
    flat = t.detach().view(-1)
    if flat.numel() == 0:
        return np.zeros(0, np.int32)
    u8 = flat.view(torch.uint8).numpy()
    addr = flat.data_ptr()
    for np_type in (np.int64, np.int32, ml_dtypes.bfloat16):
        size = np.dtype(np_type).itemsize
        if u8.size % size == 0 and addr % size == 0:
            return u8.view(np_type)
    return None
