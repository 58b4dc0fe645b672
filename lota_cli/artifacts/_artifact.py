"""The torch side of an artifact: its tensors read one at a time as torch tensors (torch imported on first use)."""

from __future__ import annotations

import math

import numpy as np

from lota_cli import LotaError
from lota_cli.artifacts._stored import StoredFile
from lota_cli.io import mapped
from lota_cli.tensors import as_torch, itemsize, positions_from_bits, unpack_bits


class Artifact(StoredFile):
    """A lota artifact opened lazily (memory-mapped); tensors are read one at a time: as torch tensors by the
    methods below, as numpy arrays by StoredFile's and by `raw`."""

    def raw(self, key: str) -> "StoredTensor":
        """One stored tensor, read lazily: index it (`[:]`, `[a:b]`) like a safetensors slice, or stream it
        in flat pieces with `mapped` (what ops.top_k_mask does)."""
        return StoredTensor(self, key)

    def bits(self, name: str):
        """Packed bits (a uint8 torch tensor) of the positions this artifact holds for `name` (dense task
        vectors: nonzeros)."""
        return as_torch(np.require(self.packed_bits(name), requirements="W"), "U8")  # a copy where mapped

    def mask(self, name: str):
        """The entries held for `name` as a flat bool torch tensor (task vectors: the nonzero ones)."""
        import torch

        return torch.from_numpy(unpack_bits(self.packed_bits(name), self.numel(name)))

    def indices(self, name: str):
        """Sorted flat positions held for `name`; stored positions must lie in the tensor and strictly
        increase (a duplicate would add its value twice in one stage and once in another)."""
        import torch

        if f"{name}::idx" in self.keys:
            return as_torch(self.positions(name).copy(), self.stored_dtype(f"{name}::idx"))
        return torch.from_numpy(positions_from_bits(self.packed_bits(name), self.numel(name)))

    def values(self, name: str):
        """A sparse delta's values for `name` (in position order, as stored), refused if any is NaN or Inf."""
        return as_torch(self.values_array(name).copy(), self.stored_dtype(f"{name}::values"))

    def held(self, name: str):
        """A sparse delta's (flat bool mask of held entries, values in row-major order of the mask), refused
        when the counts differ."""
        mask = self.mask(name)
        values = self.values(name)
        held = int(mask.count_nonzero())
        if held != values.numel():
            raise LotaError(f"{self.path}: {name}::values has {values.numel()} entries for {held} positions; the "
                            "file is corrupt: re-create it")
        return mask, values

    def dense(self, name: str, dtype=None):
        """The tensor as a dense torch delta (float32 unless `dtype`; masks: 1.0 at selected positions). A task
        vector's tensor is copied out of a memory map of just its bytes, so reading a file tensor by tensor
        keeps one tensor resident, not every page read so far."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        if self.kind == "task_vector":
            raw = self.raw(name)
            with raw.mapped() as flat:
                return as_torch(flat, raw.dtype).to(dtype, copy=True).view(self.shape(name))
        out = torch.zeros(self.numel(name), dtype=dtype)
        if self.kind == "mask":
            out.masked_fill_(self.mask(name), 1)
        elif f"{name}::bits" in self.keys:  # values fill the set bits in row-major order: no positions needed
            mask, values = self.held(name)
            out.masked_scatter_(mask, values.to(dtype))
        else:
            out[self.indices(name).long()] = self.values(name).to(dtype)
        return out.view(self.shape(name))


class StoredTensor:
    """A tensor of an Artifact, not yet read. Indexing (`[:]`, `[a:b]`, rows) copies out what it selects, as
    a torch tensor; `mapped(start, stop)` gives flat entries [start, stop) as a numpy array over a private
    memory map (see io.mapped). dtype: its safetensors name ("F32", "BF16": numpy holds it as uint16)."""

    def __init__(self, artifact: Artifact, key: str):
        self._artifact, self.key = artifact, key
        entry = artifact.entry(key)
        self.dtype = entry["dtype"]
        self.shape = tuple(entry["shape"])
        self._offset = artifact.data_offset(key)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def __getitem__(self, index):
        with self.mapped() as flat:
            return as_torch(flat, self.dtype).view(self.shape)[index].clone()

    def mapped(self, start: int = 0, stop: int | None = None):
        """Flat entries [start, stop) as a read-only-by-convention numpy array; valid only inside the `with`."""
        stop = self.numel() if stop is None else stop
        if not 0 <= start <= stop <= self.numel():
            raise IndexError(f"{self.key}: entries [{start}, {stop}) outside its {self.numel()}")
        return mapped(self._artifact.file, self._offset + start * itemsize(self.dtype), stop - start, self.dtype)
