"""Packed bits (one bit an entry, little bit order, as masks store them): packing, counting, positions."""

from __future__ import annotations

import numpy as np

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcounts(array: np.ndarray) -> np.ndarray:
    """Set bits of each element (uint8 counts)."""
    return np.bitwise_count(array) if hasattr(np, "bitwise_count") else _POPCOUNT[array]  # numpy >= 2


def pack_bits(mask) -> np.ndarray:
    """A flat bool array (numpy, or a CPU torch tensor) as packed bits: uint8, 8 entries a byte."""
    return np.packbits(np.asarray(mask).reshape(-1), bitorder="little")


def unpack_bits(bits, numel: int) -> np.ndarray:
    """Inverse of pack_bits (packed bits as numpy or a CPU torch tensor): a flat bool array of numel entries."""
    return np.unpackbits(np.asarray(bits), count=numel, bitorder="little").view(np.bool_)


def count_bits(bits) -> int:
    """Number of set entries in packed bits (numpy, or a CPU torch tensor), without unpacking them."""
    bits = np.asarray(bits)
    whole = bits.size // 8 * 8 if hasattr(np, "bitwise_count") else 0  # 8 bytes at a time where numpy can
    count = int(_popcounts(bits[:whole].view(np.uint64)).sum(dtype=np.int64)) if whole else 0
    return count + int(_popcounts(bits[whole:]).sum(dtype=np.int64))


def count_bits_per(bits: np.ndarray, step: int) -> np.ndarray:
    """Set entries in each run of `step` bytes of packed bits (the last run may be shorter), int64; counted
    8 bytes at a time where `step` allows."""
    if not bits.size:
        return np.zeros(0, np.int64)
    if step % 8 == 0 and bits.size % 8 == 0 and hasattr(np, "bitwise_count"):
        bits, step = bits.view(np.uint64), step // 8
    return np.add.reduceat(_popcounts(bits), np.arange(0, bits.size, step), dtype=np.int64)


def set_bits(bits: np.ndarray, positions: np.ndarray) -> None:
    """Set the entries at flat `positions` of packed bits, in place."""
    positions = positions.astype(np.int64, copy=False)
    np.bitwise_or.at(bits, positions >> 3, (np.int64(1) << (positions & 7)).astype(np.uint8))


def set_positions(packed: np.ndarray) -> np.ndarray:
    """Sorted positions of the set bits of a packed (little bit order) array: when few bytes hold one, only
    those are unpacked; when many do, unpacking them all is cheaper."""
    nonzero = np.flatnonzero(packed)
    if nonzero.size > packed.size // 4:
        return np.flatnonzero(np.unpackbits(packed, bitorder="little"))
    if not nonzero.size:
        return nonzero
    rows, cols = np.nonzero(np.unpackbits(packed[nonzero, None], axis=1, bitorder="little"))
    return nonzero[rows] * 8 + cols


def index_dtype(numel: int) -> np.dtype:
    """The dtype of positions into a tensor of numel entries: int32 where they fit."""
    return np.dtype(np.int32 if numel < 2**31 else np.int64)


def positions_from_bits(bits, numel: int) -> np.ndarray:
    """Sorted flat positions of the set entries (of the first numel) of packed bits (numpy or a CPU torch
    tensor), int32 where they fit."""
    positions = set_positions(np.asarray(bits))
    return positions[:np.searchsorted(positions, numel)].astype(index_dtype(numel))  # bits past numel pad


def encode_positions(bits, numel: int) -> tuple[str, np.ndarray]:
    """The smaller of packed bits and int32 positions, as numpy arrays: ('bits', uint8) or ('idx', int)."""
    bits = np.asarray(bits)
    count = count_bits(bits)
    if count * index_dtype(numel).itemsize < bits.size:
        return "idx", positions_from_bits(bits, numel)
    return "bits", bits
