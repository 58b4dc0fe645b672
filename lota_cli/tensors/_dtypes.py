"""The one table of dtypes: safetensors' names ("F32", "BF16", ...), the numpy dtype each is held in (bfloat16
as uint16: numpy has none), and torch's / numpy's name of each ("float32", "bfloat16")."""

from __future__ import annotations

import numpy as np

# safetensors name -> (numpy dtype its data is held in, the dtype's torch/numpy name)
_TABLE = {
    "F64": (np.dtype(np.float64), "float64"), "F32": (np.dtype(np.float32), "float32"),
    "F16": (np.dtype(np.float16), "float16"), "BF16": (np.dtype(np.uint16), "bfloat16"),
    "I64": (np.dtype(np.int64), "int64"), "I32": (np.dtype(np.int32), "int32"), "I16": (np.dtype(np.int16), "int16"),
    "I8": (np.dtype(np.int8), "int8"), "U8": (np.dtype(np.uint8), "uint8"), "BOOL": (np.dtype(np.bool_), "bool"),
}
_CODES = {name: code for code, (_, name) in _TABLE.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
# the dtypes lota loads models in and writes deltas and models in (model.dtype, artifact_dtype, merge's dtype)
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


def is_code(code: str) -> bool:
    """Whether `code` is a safetensors dtype name lota reads."""
    return code in _TABLE


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype data of safetensors dtype `code` is held in (bfloat16: uint16)."""
    return _TABLE[code][0]


def itemsize(code: str) -> int:
    return _TABLE[code][0].itemsize


def dtype_name(code: str) -> str:
    """torch's / numpy's name ("bfloat16") of a safetensors dtype name ("BF16")."""
    return _TABLE[code][1]


def dtype_code(dtype) -> str:
    """safetensors' name ("F32", "BF16", ...) of a torch dtype, a numpy dtype, a dtype's name ("bfloat16") or a
    safetensors name, without importing torch (the torch-free stages write numpy arrays). A numpy uint16 is
    not a dtype lota stores: bfloat16 data held as uint16 is named by its writer."""
    if isinstance(dtype, str):
        if dtype not in _TABLE and dtype not in _CODES:
            raise ValueError(f"unknown dtype {dtype!r}")
        return _CODES.get(dtype, dtype)
    return _CODES[str(dtype).removeprefix("torch.") if hasattr(dtype, "is_floating_point") else np.dtype(dtype).name]


def torch_dtype(dtype: str):
    """The torch dtype of a safetensors name ("BF16") or a dtype's name ("bfloat16"); torch imported here."""
    import torch

    return getattr(torch, dtype_name(dtype_code(dtype)))
