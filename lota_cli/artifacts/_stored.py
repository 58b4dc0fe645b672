"""A lota artifact file read without torch: its header and metadata checked (well-formed, complete, its
SHA-256), each stored tensor as a read-only numpy view of the file with its checksum checked, `verify`, and
the counts `lota info` reports. The torch side (artifacts.Artifact) is built on this, so the commands that
only inspect or select (`lota info`, extract from a task vector) start without torch.

A sparse delta's values must be finite and its positions strictly increasing (no duplicates), checked on read.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from lota_cli import LotaError, native
from lota_cli.artifacts._format import (FORMAT_VERSION, KINDS, MADE_BY, check_header_sha256, digest_of,
                                        parse_meta, tensor_digest)
from lota_cli.io import check_complete, check_data_layout, map_array, read_header, will_need
from lota_cli.tensors import count_bits, itemsize, nonfinite, nonzero, signs, unpack_bits

VERIFY_CHUNK = 1 << 24  # entries hashed per piece by StoredFile.verify


class StoredFile:
    """A lota artifact's header, metadata and stored tensors (numpy views), opened and checked at once:
    a file that is not a complete, well-formed lota artifact of one of `kinds` is refused in one line."""

    def __init__(self, path: str | Path, kinds: tuple[str, ...] = KINDS):
        self.path = Path(path)
        wanted = " or ".join(f"a {k} (made by {MADE_BY[k]})" for k in kinds)
        if not self.path.is_file():
            what = "is a directory" if self.path.is_dir() else "not found"
            raise LotaError(f"artifact {what}: {self.path}; give the path of {wanted}")
        header, raw = read_header(self.path)
        if "lota" not in header.get("__metadata__", {}):
            raise LotaError(f"{self.path} is a safetensors file but not a lota artifact (no 'lota' metadata); "
                            f"give {wanted}")
        self.meta = parse_meta(self.path, header["__metadata__"]["lota"])
        if self.meta.format > FORMAT_VERSION:
            raise LotaError(f"{self.path} uses artifact format {self.meta.format}; this lota reads up to "
                            f"{FORMAT_VERSION}: upgrade lota")
        check_header_sha256(self.path, raw, self.meta)
        check_complete(self.path, header, len(raw))
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        check_data_layout(self.path, self._entries)
        if self.meta.kind not in KINDS:
            raise LotaError(f"{self.path} has unknown artifact kind {self.meta.kind!r}; the file is corrupt")
        if self.meta.kind not in kinds:
            raise LotaError(f"{self.path} is a {self.meta.kind}; this stage needs {wanted}")
        self.keys = set(self._entries)
        self._check_layout()
        self._data_start = 8 + len(raw)  # tensor data offsets count from here
        self._fh = open(self.path, "rb")

    def __del__(self):
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()

    def _check_layout(self) -> None:
        """Every tensor the metadata lists is stored with a consistent shape, and nothing else is stored."""
        def shape(key: str) -> list[int] | None:
            return list(self._entries[key]["shape"]) if key in self.keys else None

        def corrupt(what: str) -> LotaError:
            return LotaError(f"{self.path}: {what}; the file is corrupt or was not written by lota: re-create it")

        expected = set()
        for name, dims in self.meta.shapes.items():
            if not isinstance(dims, list) or not all(isinstance(d, int) and d >= 0 for d in dims):
                raise corrupt(f"tensor {name!r} has shape {dims!r} in the metadata")
            numel = math.prod(dims)
            if self.kind == "task_vector":
                expected.add(name)
                if shape(name) != dims:
                    raise corrupt(f"tensor {name!r} is {shape(name)} but the metadata says {dims}")
                continue
            bits, idx = shape(f"{name}::bits"), shape(f"{name}::idx")
            if (bits is None) == (idx is None):
                raise corrupt(f"tensor {name!r} needs exactly one of {name}::bits and {name}::idx")
            if bits is not None and bits != [(numel + 7) // 8]:
                raise corrupt(f"{name}::bits is {bits}, not [{(numel + 7) // 8}] for shape {dims}")
            if idx is not None and (len(idx) != 1 or idx[0] > numel):
                raise corrupt(f"{name}::idx is {idx}, more positions than the {numel} of shape {dims}")
            expected.add(f"{name}::{'bits' if bits is not None else 'idx'}")
            if self.kind == "sparse_delta":
                values = shape(f"{name}::values")
                if values is None or len(values) != 1 or (idx is not None and values != idx):
                    raise corrupt(f"{name}::values is {values}, which does not match its positions")
                expected.add(f"{name}::values")
        extra = sorted(self.keys - expected)
        if extra:
            raise corrupt(f"it holds tensor {extra[0]!r}, which its metadata does not list")

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def names(self) -> list[str]:
        return list(self.meta.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta.shapes[name])

    def numel(self, name: str) -> int:
        return math.prod(self.meta.shapes[name])

    def stored_dtype(self, key: str) -> str:
        """A stored tensor's safetensors dtype ("F32", "BF16", "U8", ...)."""
        return self._entries[key]["dtype"]

    def entry(self, key: str) -> dict:
        """A stored tensor's header entry: {"dtype", "shape", "data_offsets"}."""
        return self._entries[key]

    def data_offset(self, key: str) -> int:
        """Where stored tensor `key`'s bytes begin in the file."""
        return self._data_start + self._entries[key]["data_offsets"][0]

    @property
    def file(self):
        """The artifact's open file (binary, read-only)."""
        return self._fh

    def _mapping(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat entries [start, stop) of stored tensor `key` as a read-only view of the file (a populated
        private mapping of just those bytes, freed with the last view of it; bfloat16 as uint16)."""
        entry = self._entries[key]
        stop = math.prod(entry["shape"]) if stop is None else stop
        offset = self.data_offset(key) + start * itemsize(entry["dtype"])
        return map_array(self._fh, offset, stop - start, entry["dtype"], populate=True)

    def read_ahead(self, name: str) -> None:
        """Have the stored tensors of `name` read from disk now (see will_need), to be read later."""
        for key in (name, f"{name}::bits", f"{name}::idx", f"{name}::values"):
            if key in self._entries:
                start, stop = self._entries[key]["data_offsets"]
                will_need(self._fh.fileno(), self._data_start + start, stop - start)

    def array(self, key: str) -> np.ndarray:
        """A stored tensor, flat, as a read-only numpy view of the file (no copy: a mapping of just its bytes,
        populated at once; bfloat16 as uint16), checked against its checksum. The mapping lasts as long as
        the array (or a view of it) does."""
        array = self._mapping(key)
        expected = self.meta.checksums.get(key)
        if expected and digest_of(array, self.meta.format) != expected:
            raise LotaError(f"{self.path}: tensor {key!r} does not match its checksum (a damaged copy?); "
                            "re-create the artifact or copy it again")
        return array

    def verify(self) -> int:
        """Read every tensor's data and check it against the checksum written with it, naming the first
        damaged tensor; returns the bytes checked. A format-1 artifact has no per-tensor checksums: its data
        is checked against its fingerprint (one SHA-256 over every key and its data), which cannot say where."""
        legacy, checked = hashlib.sha256(), 0
        for key, entry in self._entries.items():  # file order, the order they were written in
            digest = tensor_digest(self.meta.format) if self.meta.checksums else legacy
            if not self.meta.checksums:
                legacy.update(key.encode())
            numel = math.prod(entry["shape"])
            for start in range(0, numel, VERIFY_CHUNK):
                data = self._mapping(key, start, min(numel, start + VERIFY_CHUNK)).view(np.uint8)
                digest.update(data)
                checked += data.size
            if self.meta.checksums and digest.hexdigest() != self.meta.checksums.get(key):
                raise LotaError(f"{self.path}: tensor {key!r} does not match its checksum: its data is damaged "
                                "(re-create the artifact or copy it again)")
        if not self.meta.checksums and legacy.hexdigest() != self.meta.fingerprint:
            raise LotaError(f"{self.path}: its data does not match its fingerprint, so a tensor is damaged "
                            "(artifacts of format 1 record no per-tensor checksums to say which); re-create it")
        return checked

    def held_count(self, name: str) -> int:
        """How many entries of `name` this artifact holds: a mask's or sparse delta's positions (checked as
        read), a task vector's nonzero entries."""
        if self.kind == "task_vector":
            numel, count = self.numel(name), 0
            stored = self.stored_dtype(name)
            for start in range(0, numel, VERIFY_CHUNK):
                count += int(np.count_nonzero(nonzero(self._mapping(name, start, min(numel, start + VERIFY_CHUNK)),
                                                      stored)))
            return count
        if f"{name}::bits" in self.keys:
            return count_bits(self.array(f"{name}::bits"))
        return self.positions(name).size

    def held_mask(self, name: str) -> np.ndarray:
        """The entries of `name` this artifact holds, as a flat bool array (task vectors: the nonzero ones)."""
        if self.kind == "task_vector":
            return nonzero(self._mapping(name), self.stored_dtype(name))
        if f"{name}::bits" in self.keys:
            return unpack_bits(self.array(f"{name}::bits"), self.numel(name))
        held = np.zeros(self.numel(name), dtype=np.bool_)
        held[self.positions(name)] = True
        return held

    def packed_bits(self, name: str) -> np.ndarray:
        """held_mask as packed bits (little bit order): the stored ones, a view of the file, where they are."""
        if f"{name}::bits" in self.keys:
            return self.array(f"{name}::bits")
        return np.packbits(self.held_mask(name), bitorder="little")

    def values_array(self, name: str, check_finite: bool = True) -> np.ndarray:
        """A sparse delta's values for `name`, in position order, as a read-only view of the file (see array;
        bfloat16 as uint16), refused if any is NaN or Inf (check_finite=False: by a caller that checks them as
        it uses them, raising nonfinite_values)."""
        key = f"{name}::values"
        values = self.array(key)
        if check_finite and not native.all_finite(values, self.stored_dtype(key)):
            raise self.nonfinite_values(name)
        return values

    def nonfinite_values(self, name: str) -> LotaError:
        return nonfinite(f"{self.path}: tensor {name!r}",
                         "the run that made it diverged or the file is damaged: re-create it")

    def support(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(the entries of `name` held, a flat bool array; the sign of every entry's delta, -1, 0 or 1 as int8,
        or None for a mask, which carries no values): what `lota overlap` compares."""
        if self.kind == "task_vector":
            held_signs = signs(self._mapping(name), self.stored_dtype(name))
            return held_signs != 0, held_signs
        held = self.held_mask(name)
        if self.kind == "mask":
            return held, None
        held_signs = np.zeros(held.size, dtype=np.int8)
        held_signs[held] = signs(self.values_array(name), self.stored_dtype(f"{name}::values"))
        return held, held_signs

    def density(self, name: str | None = None) -> float:
        names = [name] if name else self.names
        return sum(self.held_count(n) for n in names) / max(sum(self.numel(n) for n in names), 1)

    def positions(self, name: str) -> np.ndarray:
        """A mask's or sparse delta's stored positions (`NAME::idx`), refused unless they lie in the tensor and
        strictly increase (a duplicate would add its value twice in one stage and once in another)."""
        idx = self.array(f"{name}::idx")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.numel(name)):
            raise LotaError(f"{self.path}: {name}::idx holds positions outside the tensor's "
                            f"{self.numel(name)} entries; the file is corrupt: re-create it")
        if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise LotaError(f"{self.path}: {name}::idx holds duplicate or unsorted positions; the file is "
                            "corrupt or was not written by lota: re-create it")
        return idx

    def check_base(self, fingerprint: str, base_model: str) -> None:
        """Refuse an artifact made from another base model. A PEFT adapter not made by lota records no base
        fingerprint (""): its tensor names and shapes are what is checked against the base (interop)."""
        if self.meta.base_fingerprint and fingerprint and self.meta.base_fingerprint != fingerprint:
            raise LotaError(
                f"{self.path} was made from base {self.meta.base_model!r} (fingerprint "
                f"{self.meta.base_fingerprint[:12]}), but the base here is {base_model!r} (fingerprint "
                f"{fingerprint[:12]}); use artifacts made from this base model"
            )


def same_layout(artifacts: list[StoredFile]) -> None:
    """Refuse artifacts of different bases, tensor names or shapes, naming the first offending tensor."""
    first = artifacts[0]
    for other in artifacts[1:]:
        other.check_base(first.meta.base_fingerprint, first.meta.base_model)
        for name in first.names:
            if name not in other.meta.shapes:
                raise LotaError(f"{other.path} has no tensor {name!r}, which {first.path} has")
            if other.shape(name) != first.shape(name):
                raise LotaError(f"tensor {name!r} is {list(other.shape(name))} in {other.path} but "
                                f"{list(first.shape(name))} in {first.path}")
        extra = [n for n in other.names if n not in first.meta.shapes]
        if extra:
            raise LotaError(f"{other.path} has tensor {extra[0]!r}, which {first.path} lacks")
