"""Stored data as numpy sees it (bfloat16 as uint16) and as torch sees it, and what its entries hold: which
are nonzero, their signs, whether all are finite."""

from __future__ import annotations

import math

import numpy as np

from lota_cli import LotaError
from lota_cli.tensors._dtypes import torch_dtype


def as_numpy(x) -> np.ndarray:
    """A numpy array's or a CPU torch tensor's entries as a flat, contiguous numpy array (bfloat16 as uint16),
    a view where they already are contiguous."""
    if isinstance(x, np.ndarray):
        return x.reshape(-1)
    x = x.detach().reshape(-1).cpu()
    if str(x.dtype) == "torch.bfloat16":
        import torch

        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def as_torch(array: np.ndarray, code: str):
    """A torch tensor over the numpy `array` of stored data of safetensors dtype `code` (no copy)."""
    import torch

    return torch.from_numpy(array).view(torch_dtype(code))


def finite_array(array: np.ndarray, code: str) -> bool:
    """No NaN or Inf in numpy data of safetensors dtype `code` (bfloat16 as uint16): numpy's passes, no
    temporary of the array's size (native.all_finite is the faster pass where the kernels are built)."""
    if not array.size or code not in ("F64", "F32", "F16", "BF16"):
        return True
    if code == "BF16":  # the exponent's bits all set: Inf or NaN
        return int(np.bitwise_and(array, 0x7FFF).max()) < 0x7F80
    return math.isfinite(array.min()) and math.isfinite(array.max())  # NaN propagates through both


def nonfinite(what: str, why: str) -> LotaError:
    """The one message for NaN or Inf values found where they cannot be: `what` holds them, `why` says how it
    came to and what to do."""
    return LotaError(f"{what} holds NaN or Inf values; {why}")


def nonzero(data: np.ndarray, code: str) -> np.ndarray:
    """Which entries of stored data (bfloat16 as uint16) are not 0; -0.0 is 0."""
    if code in ("BF16", "F16"):  # the sign bit masked off
        return np.bitwise_and(data.view(np.uint16), 0x7FFF) != 0
    return data != 0


def signs(data: np.ndarray, code: str) -> np.ndarray:
    """-1, 0 or 1 (int8) per entry of stored floating-point data (bfloat16 as uint16); -0.0 is 0."""
    if code in ("BF16", "F16"):  # the sign bit, where the rest is not all zero
        return np.where(nonzero(data, code), np.where(data.view(np.uint16) >> 15, -1, 1), 0).astype(np.int8)
    return np.sign(data).astype(np.int8)
