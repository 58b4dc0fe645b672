"""Artifacts: one safetensors file each, with lota's metadata in the header.

Kinds:
  task_vector   dense delta per tensor, stored under the parameter name
  mask          selected positions per tensor: `NAME::bits` (packed, 1 bit/entry) or `NAME::idx` (int32
                positions), whichever is smaller
  sparse_delta  a mask plus `NAME::values`, the delta at the selected positions in row-major order

Files are written by streaming tensor by tensor into a temporary file beside the target, which is renamed
into place only when complete: a killed stage never leaves a truncated artifact behind. The header records
the base model and a fingerprint of its weights, so a stage can refuse an artifact made from another base,
and a SHA-256 of the header itself, so a flipped byte in the metadata (a shape, the kind, the base) is
caught when the file is opened rather than producing a wrong result later. Tensor data is covered by a
SHA-256 per tensor, computed as it is written (no second pass): the small tensors of masks and sparse deltas
are checked whenever they are read; a task vector's, which can be gigabytes, by `lota info --verify`.
A sparse delta's values must be finite and its positions strictly increasing (no duplicates), checked on read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors import safe_open

from lota_cli import LotaError, __version__
from lota_cli.masks import count_bits, indices_from_bits, unpack_bits

FORMAT_VERSION = 2  # 2: per-tensor checksums, and the fingerprint computed from them
KINDS = ("task_vector", "mask", "sparse_delta")
MADE_BY = {"task_vector": "calibrate or merge", "mask": "extract", "sparse_delta": "sparse-train or lotto"}
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_NO_FINGERPRINT = "0" * 64
VERIFY_CHUNK = 1 << 24  # entries hashed per piece by Artifact.verify


@dataclass
class Meta:
    """What an artifact says about itself (stored as JSON under the header key `lota`)."""

    kind: str
    base_model: str
    base_fingerprint: str
    stage: str
    shapes: dict[str, list[int]] = field(default_factory=dict)
    sparsity: float | None = None
    seed: int | None = None
    config: dict = field(default_factory=dict)
    parents: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    fingerprint: str = _NO_FINGERPRINT
    header_sha256: str = ""  # of the whole header with this field zeroed; empty in artifacts of lota < 0.1.1
    checksums: dict[str, str] = field(default_factory=dict)  # key -> SHA-256 of its data; empty in format 1
    # the base's weights as saved, fingerprinted in name order (models.saved_fingerprint): checkable from the
    # base's shards alone; empty where unknown
    base_checkpoint: str = ""
    # a mask's: what ranked its entries, {"name": extract.source, ...what makes it reproducible}; empty where
    # not recorded (other kinds, lotto's masks, older masks)
    source: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def library_versions() -> dict[str, str]:
    """Versions recorded in artifacts; transformers' read from its metadata, not imported (a second of
    start-up for the stages that never use it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = "none"
    return {"lota": __version__, "torch": torch.__version__, "transformers": transformers}


def stage_meta(kind: str, stage: str, cfg, base_model: str, base_fingerprint: str, parents: list[str] = (),
               sparsity: float | None = None, base_checkpoint: str = "", source: dict | None = None) -> Meta:
    """Metadata for an artifact a stage writes: what it is, what it came from, how to reproduce it."""
    from dataclasses import asdict, is_dataclass

    config = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    seed = config.get("train", {}).get("seed", config.get("seed"))
    return Meta(kind=kind, base_model=base_model, base_fingerprint=base_fingerprint, base_checkpoint=base_checkpoint,
                stage=stage, sparsity=sparsity, seed=seed, source=dict(source or {}),
                config=config, parents=list(parents), versions=library_versions())


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a floating-point tensor: one min/max pass (NaN propagates through both), no
    temporary bool tensor of its size."""
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    return all(map(math.isfinite, torch.aminmax(tensor.reshape(-1))))


def _finite_array(array: np.ndarray, stored: str) -> bool:
    """all_finite for a numpy view of stored data (`stored`: its safetensors dtype; bfloat16 as uint16)."""
    if not array.size or stored not in ("F64", "F32", "F16", "BF16"):
        return True
    if stored == "BF16":  # the exponent's bits all set: Inf or NaN
        return int(np.bitwise_and(array, 0x7FFF).max()) < 0x7F80
    return math.isfinite(array.min()) and math.isfinite(array.max())  # NaN propagates through both


# --------------------------------------------------------------------------- writing

class TensorFileWriter:
    """Streams tensors into a safetensors file, atomically: `layout` fixes every key's dtype and shape up
    front, so the header is written first and each tensor's bytes follow as they come (whole, or in pieces
    with write_pieces: a tensor larger than memory never has to be held). The data goes to a temporary file
    beside `path`, renamed into place only when complete, so a killed process never leaves a truncated file.
    Each tensor's bytes are hashed (SHA-256) as they are written, `checksums` holding them at the end, and
    refused if they hold NaN or Inf; checked=False skips both (a model's shards, checked by their writer).

    with TensorFileWriter(path, layout) as w:
        for key, tensor in ...: w.write(key, tensor)
    """

    def __init__(self, path: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 checked: bool = True):
        self.path, self.layout, self.checked = Path(path), layout, checked
        self._keys = list(layout)
        self.checksums: dict[str, str] = {}

    def metadata(self) -> dict[str, str]:
        """The header's __metadata__ (subclasses add theirs; must keep its length once written)."""
        return {"format": "pt"}

    def _header(self) -> bytes:
        # no sort_keys: keys keep the layout's (model) order, which Artifact.names reports
        header: dict = {"__metadata__": self.metadata()}
        offset = 0
        for key, (dtype, shape) in self.layout.items():
            size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    def _error(self, err: OSError) -> LotaError:
        return LotaError(f"could not write {self.path}: {err.strerror or err}; make sure {self.path.parent} is a "
                         "writable directory with free space (or choose another out=)")

    def __enter__(self):
        self._tmp = self._file = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self._tmp, self._file = Path(tmp), os.fdopen(fd, "wb")
            header = self._header()
            self._header_size = len(header)
            self._starts, offset = {}, 8 + len(header)  # where each tensor's data begins in the file
            for key, (dtype, shape) in self.layout.items():
                self._starts[key], offset = offset, offset + math.prod(shape) * dtype.itemsize
            self._file.write(struct.pack("<Q", len(header)) + header)
        except OSError as err:
            self._discard()
            raise self._error(err) from err
        return self

    def _discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.layout.get(key)
        if (tensor.dtype, tuple(tensor.shape)) != expected:
            raise ValueError(f"writing {key} {tensor.dtype} {tuple(tensor.shape)} out of layout {expected}")
        self.write_pieces(key, [tensor])

    def write_pieces(self, key: str, pieces: Iterable[torch.Tensor]) -> None:
        """Tensor `key` as consecutive flat pieces of its dtype (row-major order), in layout order."""
        if len(self.checksums) >= len(self._keys) or key != self._keys[len(self.checksums)]:
            raise ValueError(f"writing {key} out of layout order")
        dtype, shape = self.layout[key]
        digest, written = hashlib.sha256(), 0
        for piece in pieces:
            if piece.dtype != dtype:
                raise ValueError(f"writing {key}: a {piece.dtype} piece into a {dtype} tensor")
            if self.checked and not all_finite(piece):
                raise LotaError(f"refusing to write {self.path}: tensor {key!r} holds NaN or Inf values (the run "
                                f"diverged, or {str(dtype).removeprefix('torch.')} cannot hold them); lower the "
                                "learning rate or write float32")
            data = piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            if self.checked:
                digest.update(data)
            self._file.write(data)
            written += piece.numel()
        if written != math.prod(shape):
            raise ValueError(f"writing {key}: {written} entries of {math.prod(shape)}")
        self.checksums[key] = digest.hexdigest() if self.checked else ""

    def copy_from(self, key: str, source: str | Path, offset: int) -> None:
        """Tensor `key`'s bytes copied as they are from byte `offset` of file `source` (in layout order), by the
        kernel where it can (copy_file_range: no pass through this process, several times faster than
        writing the same bytes here). For unchecked files only: nothing here sees the data."""
        if self.checked:
            raise ValueError("copy_from writes data unseen: only for unchecked files")
        if len(self.checksums) >= len(self._keys) or key != self._keys[len(self.checksums)]:
            raise ValueError(f"writing {key} out of layout order")
        self.checksums[key] = ""  # in order now: the next tensor may be copied while this one is changed
        dtype, shape = self.layout[key]
        left = math.prod(shape) * dtype.itemsize
        self._file.flush()
        at = self._data_start(key)
        with open(source, "rb") as src:
            while left:
                try:
                    done = os.copy_file_range(src.fileno(), self._file.fileno(), left, offset, at)
                except (AttributeError, OSError):  # not Linux, or not between these files: through here
                    src.seek(offset)
                    done = os.pwrite(self._file.fileno(), src.read(min(left, 1 << 26)), at)
                if done == 0:
                    raise LotaError(f"{source} ends inside tensor {key!r}; the file is truncated: copy it again")
                left, offset, at = left - done, offset + done, at + done
        self._file.seek(at)

    def mapped(self, key: str, start: int, stop: int):
        """Flat entries [start, stop) of tensor `key`, already written, as a writable view of the file itself
        (a shared mapping, populated at once): what is changed there is written. Valid inside the `with`."""
        dtype, _ = self.layout[key]
        self._file.flush()
        return mapped_range(self._file, self._data_start(key) + start * dtype.itemsize, stop - start, dtype,
                            shared=True)

    def write_back(self, key: str) -> None:
        """Start writing tensor `key`'s pages to disk now, without waiting (and let the cache drop them once
        written): the final fsync then finds little left to do, and a model larger than memory does not push
        the pages still to be read out of the page cache. Where the system cannot, nothing happens."""
        dtype, shape = self.layout[key]
        self._file.flush()
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(self._file.fileno(), self._data_start(key), math.prod(shape) * dtype.itemsize,
                             os.POSIX_FADV_DONTNEED)

    def _data_start(self, key: str) -> int:
        return self._starts[key]

    def _finish(self) -> None:
        """Called once every tensor is written, before the file is synced and renamed (header rewrites)."""

    def _rewrite_header(self) -> None:
        header = self._header()
        if len(header) != self._header_size:
            raise AssertionError("a header rewrite must keep its length")
        self._file.seek(8)
        self._file.write(header)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if len(self.checksums) != len(self.layout):
                    raise ValueError(f"{self.path}: {len(self.layout) - len(self.checksums)} tensors unwritten")
                self._finish()
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self._tmp, self.path)
        except OSError as err:
            raise self._error(err) from err
        finally:
            self._discard()
        if isinstance(exc, OSError):  # a write inside the `with` failed (full disk, I/O error)
            raise self._error(exc) from exc


class ArtifactWriter(TensorFileWriter):
    """A TensorFileWriter whose header carries the artifact's Meta; at the end the metadata gains the
    per-tensor checksums, the artifact's fingerprint (a SHA-256 over the names and those checksums) and the
    SHA-256 of the header itself, written in place (fixed-width hex digests, so the header keeps its length)."""

    def __init__(self, path: str | Path, meta: Meta, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        if meta.kind not in KINDS:
            raise ValueError(f"unknown artifact kind {meta.kind!r}")
        super().__init__(path, layout)
        self.meta = meta
        meta.checksums = {key: _NO_FINGERPRINT for key in layout}  # placeholders of the final width
        meta.header_sha256 = _NO_FINGERPRINT
        meta.format = FORMAT_VERSION

    def metadata(self) -> dict[str, str]:
        return {"format": "pt", "lota": json.dumps(asdict(self.meta))}

    def _finish(self) -> None:
        self.meta.checksums = dict(self.checksums)
        self.meta.fingerprint = tensors_fingerprint(self.checksums)
        self.meta.header_sha256 = _NO_FINGERPRINT
        self.meta.header_sha256 = hashlib.sha256(self._header()).hexdigest()
        self._rewrite_header()


def tensors_fingerprint(checksums: dict[str, str]) -> str:
    """An artifact's fingerprint (format 2): SHA-256 over its keys and their data's SHA-256, in file order."""
    digest = hashlib.sha256()
    for key, checksum in checksums.items():
        digest.update(f"{key}:{checksum};".encode())
    return digest.hexdigest()


def save_dense(path, meta: Meta, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a task vector (dense tensors under their own names)."""
    meta.shapes = {n: list(t.shape) for n, t in tensors.items()}
    with ArtifactWriter(path, meta, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}) as w:
        for name, tensor in tensors.items():
            w.write(name, tensor)
    return Path(path)


def save_sparse(path, meta: Meta, shapes: dict[str, tuple[int, ...]], positions: dict[str, tuple[str, torch.Tensor]],
                values: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a mask (positions only) or a sparse delta (positions and values).

    positions: name -> ('bits' | 'idx', tensor), as masks.encode_positions returns.
    """
    meta.shapes = {n: list(shapes[n]) for n in positions}
    tensors = {}
    for name, (encoding, pos) in positions.items():
        tensors[f"{name}::{encoding}"] = pos
        if values is not None:
            tensors[f"{name}::values"] = values[name]
    with ArtifactWriter(path, meta, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}) as w:
        for key, tensor in tensors.items():
            w.write(key, tensor)
    return Path(path)


# --------------------------------------------------------------------------- reading

class Artifact:
    """A lota artifact opened lazily (memory-mapped); tensors are read one at a time."""

    def __init__(self, path: str | Path, kinds: tuple[str, ...] = KINDS):
        self.path = Path(path)
        wanted = " or ".join(f"a {k} (made by {MADE_BY[k]})" for k in kinds)
        if not self.path.is_file():
            what = "is a directory" if self.path.is_dir() else "not found"
            raise LotaError(f"artifact {what}: {self.path}; give the path of {wanted}")
        header, raw = _read_header(self.path)
        if "lota" not in header.get("__metadata__", {}):
            raise LotaError(f"{self.path} is a safetensors file but not a lota artifact (no 'lota' metadata); "
                            f"give {wanted}")
        self.meta = _parse_meta(self.path, header["__metadata__"]["lota"])
        if self.meta.format > FORMAT_VERSION:
            raise LotaError(f"{self.path} uses artifact format {self.meta.format}; this lota reads up to "
                            f"{FORMAT_VERSION}: upgrade lota")
        _check_header_sha256(self.path, raw, self.meta)
        _check_complete(self.path, header, len(raw))
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise LotaError(f"{self.path} is not a readable safetensors file ({err}); re-create it or copy it "
                            "again") from err
        if self.meta.kind not in KINDS:
            raise LotaError(f"{self.path} has unknown artifact kind {self.meta.kind!r}; the file is corrupt")
        if self.meta.kind not in kinds:
            raise LotaError(f"{self.path} is a {self.meta.kind}; this stage needs {wanted}")
        self.keys = set(self._file.keys())
        self._check_layout()
        self._data_start = 8 + len(raw)  # tensor data offsets count from here
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self._fh = open(self.path, "rb")  # for StoredTensor.mapped: the same file safetensors mapped

    def __del__(self):
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()

    def _check_layout(self) -> None:
        """Every tensor the metadata lists is stored with a consistent shape, and nothing else is stored."""
        def shape(key: str) -> list[int] | None:
            return list(self._file.get_slice(key).get_shape()) if key in self.keys else None

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

    def raw(self, key: str) -> "StoredTensor":
        """One stored tensor, read lazily: index it (`[:]`, `[a:b]`) like a safetensors slice, or stream it
        in flat pieces with `mapped` (what masks.top_k_mask does)."""
        return StoredTensor(self, key)

    def _checked(self, key: str) -> torch.Tensor:
        """A whole (small) stored tensor of a mask or sparse delta, its bytes checked against the checksum
        recorded when it was written: a flipped bit in a position or a value is caught, not used."""
        array = self.array(key)
        return torch.from_numpy(array.copy()).view(self.raw(key).dtype).view(self.raw(key).shape)

    def array(self, key: str) -> np.ndarray:
        """A stored tensor, flat, as a read-only numpy view of the file (no copy: a mapping of just its bytes,
        populated at once; bfloat16 as uint16), checked against its checksum. The mapping lasts as long as
        the array (or a view of it) does."""
        stored = self.raw(key)
        dtype = _NUMPY_DTYPES[self._entries[key]["dtype"]]
        length = stored.numel() * dtype.itemsize
        if not length:
            array = np.empty(0, dtype)
        else:
            aligned = stored._offset - stored._offset % mmap.ALLOCATIONGRANULARITY
            region = mmap.mmap(self._fh.fileno(), stored._offset - aligned + length, offset=aligned,
                               flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
            array = np.frombuffer(region, dtype=dtype, count=stored.numel(), offset=stored._offset - aligned)
        expected = self.meta.checksums.get(key)
        if expected and hashlib.sha256(array.view(np.uint8)).hexdigest() != expected:
            raise LotaError(f"{self.path}: tensor {key!r} does not match its checksum (a damaged copy?); "
                            "re-create the artifact or copy it again")
        return array

    def bits(self, name: str) -> torch.Tensor:
        """Packed bits of the positions this artifact holds for `name` (dense task vectors: nonzeros)."""
        from lota_cli.masks import pack_bits

        if self.kind == "task_vector":
            return pack_bits(self._file.get_tensor(name).reshape(-1) != 0)
        if f"{name}::bits" in self.keys:
            return self._checked(f"{name}::bits")
        mask = torch.zeros(self.numel(name), dtype=torch.bool)
        mask[self.indices(name).long()] = True
        return pack_bits(mask)

    def indices(self, name: str) -> torch.Tensor:
        """Sorted flat positions held for `name`; stored positions must lie in the tensor and strictly
        increase (a duplicate would add its value twice in one stage and once in another)."""
        if f"{name}::idx" in self.keys:
            idx = self._checked(f"{name}::idx")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.numel(name)):
                raise LotaError(f"{self.path}: {name}::idx holds positions outside the tensor's "
                                f"{self.numel(name)} entries; the file is corrupt: re-create it")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise LotaError(f"{self.path}: {name}::idx holds duplicate or unsorted positions; the file is "
                                "corrupt or was not written by lota: re-create it")
            return idx
        return indices_from_bits(self.bits(name), self.numel(name))

    def values(self, name: str) -> torch.Tensor:
        """A sparse delta's values for `name` (in position order, as stored), refused if any is NaN or Inf."""
        return torch.from_numpy(self.values_array(name).copy()).view(self.raw(f"{name}::values").dtype)

    def values_array(self, name: str) -> np.ndarray:
        """values(), as a read-only view of the file (see array; bfloat16 as uint16)."""
        key = f"{name}::values"
        values = self.array(key)
        if not _finite_array(values, self._entries[key]["dtype"]):
            raise LotaError(f"{self.path}: tensor {name!r} holds NaN or Inf values; the run that made it "
                            "diverged or the file is damaged: re-create it")
        return values

    def held(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A sparse delta's (flat bool mask of held entries, values in row-major order of the mask), refused
        when the counts differ."""
        mask = unpack_bits(self.bits(name), self.numel(name))
        values = self.values(name)
        held = int(mask.count_nonzero())
        if held != values.numel():
            raise LotaError(f"{self.path}: {name}::values has {values.numel()} entries for {held} positions; the "
                            "file is corrupt: re-create it")
        return mask, values

    def verify(self) -> int:
        """Read every tensor's data and check it against the checksum written with it, naming the first
        damaged tensor; returns the bytes checked. A format-1 artifact has no per-tensor checksums: its data
        is checked against its fingerprint (one SHA-256 over every key and its data), which cannot say where."""
        legacy, checked = hashlib.sha256(), 0
        for key in self._entries:  # file order, the order they were written in
            digest = hashlib.sha256() if self.meta.checksums else legacy
            if not self.meta.checksums:
                legacy.update(key.encode())
            stored = self.raw(key)
            for start in range(0, stored.numel(), VERIFY_CHUNK):
                with stored.mapped(start, min(stored.numel(), start + VERIFY_CHUNK)) as piece:
                    data = piece.view(torch.uint8).numpy()
                    digest.update(data)
                    checked += data.size
                    del data, piece  # before the mapping closes
            if self.meta.checksums and digest.hexdigest() != self.meta.checksums.get(key):
                raise LotaError(f"{self.path}: tensor {key!r} does not match its checksum: its data is damaged "
                                "(re-create the artifact or copy it again)")
        if not self.meta.checksums and legacy.hexdigest() != self.meta.fingerprint:
            raise LotaError(f"{self.path}: its data does not match its fingerprint, so a tensor is damaged "
                            "(artifacts of format 1 record no per-tensor checksums to say which); re-create it")
        return checked

    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor as a dense delta (masks: 1.0 at selected positions). A task vector's tensor is copied out
        of a memory map of just its bytes, so reading a file tensor by tensor keeps one tensor resident, not
        every page read so far."""
        if self.kind == "task_vector":
            with self.raw(name).mapped() as flat:
                return flat.to(dtype, copy=True).view(self.shape(name))
        out = torch.zeros(self.numel(name), dtype=dtype)
        if self.kind == "mask":
            out.masked_fill_(unpack_bits(self.bits(name), self.numel(name)), 1)
        elif f"{name}::bits" in self.keys:  # values fill the set bits in row-major order: no positions needed
            mask, values = self.held(name)
            out.masked_scatter_(mask, values.to(dtype))
        else:
            out[self.indices(name).long()] = self.values(name).to(dtype)
        return out.view(self.shape(name))

    def items(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.dense(name, dtype)

    def density(self, name: str | None = None) -> float:
        names = [name] if name else self.names
        total = sum(self.numel(n) for n in names)
        held = sum(count_bits(self.bits(n)) for n in names)
        return held / max(total, 1)

    def check_base(self, fingerprint: str, base_model: str) -> None:
        """Refuse an artifact made from another base model. A PEFT adapter not made by lota records no base
        fingerprint (""): its tensor names and shapes are what is checked against the base (peft_io)."""
        if self.meta.base_fingerprint and fingerprint and self.meta.base_fingerprint != fingerprint:
            raise LotaError(
                f"{self.path} was made from base {self.meta.base_model!r} (fingerprint "
                f"{self.meta.base_fingerprint[:12]}), but the base here is {base_model!r} (fingerprint "
                f"{fingerprint[:12]}); use artifacts made from this base model"
            )


_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}
_NUMPY_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                 "BF16": np.dtype(np.uint16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
                 "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}


class StoredTensor:
    """A tensor of an Artifact, not yet read. Indexing (`[:]`, `[a:b]`, rows) reads through safetensors;
    `mapped(start, stop)` gives flat entries [start, stop) over a private memory map (see mapped_range)."""

    def __init__(self, artifact: "Artifact", key: str):
        self._artifact, self.key = artifact, key
        entry = artifact._entries[key]
        self.dtype = _TORCH_DTYPES[entry["dtype"]]
        self.shape = tuple(entry["shape"])
        self._itemsize = torch.tensor([], dtype=self.dtype).element_size()
        self._offset = artifact._data_start + entry["data_offsets"][0]
        self._slice = None

    def _get(self):
        if self._slice is None:
            self._slice = self._artifact._file.get_slice(self.key)
        return self._slice

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return _DTYPES[self.dtype]

    def numel(self) -> int:
        return math.prod(self.shape)

    def __getitem__(self, index):
        return self._get()[index]

    def mapped(self, start: int = 0, stop: int | None = None):
        """Flat entries [start, stop) as a read-only-by-convention tensor; valid only inside the `with`."""
        stop = self.numel() if stop is None else stop
        if not 0 <= start <= stop <= self.numel():
            raise IndexError(f"{self.key}: entries [{start}, {stop}) outside its {self.numel()}")
        return mapped_range(self._artifact._fh, self._offset + start * self._itemsize, stop - start, self.dtype)


@contextlib.contextmanager
def mapped_range(file, offset: int, count: int, dtype: torch.dtype, shared: bool = False) -> Iterator[torch.Tensor]:
    """`count` entries of `dtype` at byte `offset` of `file` (an open binary file or a path), as a tensor over
    a private memory map of just that range, unmapped again on leaving the `with`: streaming a large file
    through it in pieces holds one piece in the process (resident set), not every page read so far, and
    copies nothing (the first pass over a piece reads the page cache directly). shared=True: a shared,
    writable mapping of a file opened for writing, whose pages are mapped at once (one fault, not one a page)."""
    length = count * torch.tensor([], dtype=dtype).element_size()
    if length == 0:
        yield torch.empty(0, dtype=dtype)
        return
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    with contextlib.ExitStack() as stack:
        fh = file if hasattr(file, "fileno") else stack.enter_context(open(file, "rb"))
        # ACCESS_COPY: a private mapping, so the buffer is writable for torch (no warning) and a write could
        # never reach the file; pages are shared with the page cache until written
        if shared:
            region = mmap.mmap(fh.fileno(), offset - aligned + length, offset=aligned,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        else:
            region = mmap.mmap(fh.fileno(), offset - aligned + length, offset=aligned, access=mmap.ACCESS_COPY)
    view = torch.frombuffer(region, dtype=torch.uint8, offset=offset - aligned, count=length)
    try:
        yield view.view(dtype)
    finally:
        del view
        try:
            region.close()
        except BufferError:  # the caller kept a view: the mapping goes when that is freed
            pass


def _read_header(path: Path) -> tuple[dict, bytes]:
    """The parsed safetensors header and its raw bytes, refusing anything that is not a well-formed one."""
    def damaged(why: str) -> LotaError:
        return LotaError(f"{path} is not a readable safetensors file: {why}; re-create it or copy it again")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise damaged(f"it is only {size} bytes long (truncated?)")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise damaged(f"the header length {n:,} exceeds the file's {size:,} bytes (damaged or truncated)")
            raw = f.read(n)
    except OSError as err:
        raise LotaError(f"cannot read {path}: {err.strerror or err}; check that the file is readable") from err
    try:
        header = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        raise damaged("its header is not valid JSON (damaged)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise damaged("its header is not a JSON object of tensors (damaged)")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(v, int) and v >= 0 for v in info["shape"] + info["data_offsets"]))
        if not ok:
            raise damaged(f"the header entry of tensor {key!r} is malformed (damaged)")
    return header, raw


def _parse_meta(path: Path, text) -> Meta:
    try:
        fields = json.loads(text)
        meta = Meta(**fields)
    except (ValueError, TypeError) as err:
        raise LotaError(f"{path}: its lota metadata is damaged ({str(err)[:120]}); re-create the artifact") from None
    if not (isinstance(meta.shapes, dict) and isinstance(meta.kind, str) and isinstance(meta.format, int)):
        raise LotaError(f"{path}: its lota metadata is damaged (wrong types); re-create the artifact")
    return meta


def _check_header_sha256(path: Path, raw: bytes, meta: Meta) -> None:
    """The header is byte for byte what lota wrote (artifacts from before the checksum are let through)."""
    if not meta.header_sha256:
        return
    digest = str(meta.header_sha256).encode()
    zeroed = raw.replace(digest, _NO_FINGERPRINT.encode())
    if raw.count(digest) != 1 or hashlib.sha256(zeroed).hexdigest() != meta.header_sha256:
        raise LotaError(f"{path} is corrupt: its header does not match its checksum (a damaged copy?); "
                        "re-create it or copy it again")


def _check_complete(path: Path, header: dict, n: int) -> None:
    """Catch truncated files before safetensors maps them: the header's data size must match the file."""
    size = path.stat().st_size
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        what = "truncated" if size < 8 + n + end else "corrupt (it has bytes past its data)"
        raise LotaError(f"{path} is {what}: header promises {8 + n + end:,} bytes, file has "
                        f"{size:,}; re-create it or copy it again")


def open_artifact(path: str | Path, kinds: tuple[str, ...] = KINDS) -> Artifact:
    """What the stages read wherever they take artifacts: an artifact file, or a PEFT sparse adapter (its
    directory or its adapter_model.safetensors) converted on read into a sparse delta (lota_cli.peft_io)."""
    from lota_cli import peft_io

    if peft_io.is_adapter(path):
        return peft_io.read_adapter(Path(path), kinds)
    return Artifact(path, kinds)


def same_layout(artifacts: list[Artifact]) -> None:
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
