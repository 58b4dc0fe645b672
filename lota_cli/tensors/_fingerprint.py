"""Fingerprints of weights: a SHA-256 over names, shapes and a strided sample of values rounded to bfloat16,
the same whether the weights are a loaded model's torch tensors or a checkpoint's memory-mapped bytes."""

from __future__ import annotations

import hashlib
import math

import numpy as np

FINGERPRINT_SAMPLES = 4096  # values sampled per tensor by fingerprint_of


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """A float32 or float16 numpy array rounded to bfloat16 as torch rounds (to nearest, ties to even; NaN as
    torch's scalar path writes it, 0x7FC0), as uint16; uint16 (bfloat16 as stored) is returned as it is."""
    if array.dtype == np.uint16:
        return array
    single = np.asarray(array, dtype=np.float32)
    bits = single.view(np.uint32)
    out = ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    out[np.isnan(single)] = 0x7FC0
    return out


def fingerprint_of(tensors) -> str:
    """A SHA-256 of the names, shapes and a strided sample of each tensor's values as bfloat16, over (name,
    shape, flat tensor) in the order given (a model's state_dict order: models.fingerprint). A flat tensor is a
    torch tensor, or a numpy view of a memory-mapped file (bfloat16 as uint16), of which only the sampled
    entries are read.

    Hashing every byte of a 70B model would take minutes; a strided sample of every tensor tells bases apart
    (another fine-tune of the same architecture differs in the sampled values) at no noticeable cost. Values
    are hashed as bfloat16, so the same weights loaded in float32 or bfloat16 match."""
    digest = hashlib.sha256()
    for name, shape, flat in tensors:
        step = max(1, math.prod(shape) // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES]
        digest.update(f"{name}:{list(shape)}".encode())
        if isinstance(sample, np.ndarray):
            digest.update(bfloat16_bits(sample).tobytes())
        else:
            import torch

            digest.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()
