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
checksum per tensor (XXH3-128), computed as it is written (no second pass): the small tensors of masks and sparse deltas
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
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lota_cli import LotaError, __version__, native, sequential
from lota_cli.masks import indices_from_bits, unpack_bits
from lota_cli.sequential import SequentialFile
from lota_cli.stored import (_NO_FINGERPRINT, FORMAT_VERSION, KINDS, NUMPY_DTYPES, Meta, StoredFile, as_numpy,
                             finite_array, is_adapter, map_bytes, tensor_digest, tensors_fingerprint)

# torch's (and numpy's) dtype names -> safetensors'; bfloat16 is held by numpy as uint16
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
          "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_NAMES = {code: name for name, code in _CODES.items()}


def dtype_code(dtype) -> str:
    """safetensors' name ("F32", "BF16", ...) of a torch dtype, a numpy dtype, a dtype's name ("bfloat16") or a
    safetensors name, without importing torch: the stages that never compute in torch (extract from a task
    vector, merge of sparse deltas) write numpy arrays."""
    if isinstance(dtype, str):
        if dtype not in NUMPY_DTYPES and dtype not in _CODES:
            raise ValueError(f"unknown dtype {dtype!r}")
        return _CODES.get(dtype, dtype)
    return _CODES[str(dtype).removeprefix("torch.") if hasattr(dtype, "is_floating_point") else np.dtype(dtype).name]


def dtype_name(code: str) -> str:
    """The torch/numpy name ("bfloat16") of a safetensors dtype name ("BF16")."""
    return _NAMES[code]


def torch_dtype(code: str):
    """The torch dtype of a safetensors name."""
    import torch

    return getattr(torch, _NAMES[code])


def as_torch(array: np.ndarray, code: str):
    """A torch tensor over the numpy `array` of stored data of safetensors dtype `code` (no copy)."""
    import torch

    return torch.from_numpy(array).view(torch_dtype(code))


def _piece_code(piece, code: str) -> str:
    """The safetensors dtype of a piece written as `code`: a numpy uint16 piece is bfloat16 where one is due."""
    if isinstance(piece, np.ndarray) and piece.dtype == np.uint16 and code == "BF16":
        return code
    return dtype_code(piece.dtype)


def library_versions() -> dict[str, str]:
    """Versions recorded in artifacts; transformers' read from its metadata, not imported (a second of
    start-up for the stages that never use it)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "none"

    torch = sys.modules.get("torch")  # the running one where imported (its metadata may name another build)
    return {"lota": __version__, "torch": torch.__version__ if torch else installed("torch"),
            "transformers": installed("transformers")}


def stage_meta(kind: str, stage: str, cfg, base_model: str, base_fingerprint: str, parents: list[str] = (),
               sparsity: float | None = None, base_checkpoint: str = "", source: dict | None = None) -> Meta:
    """Metadata for an artifact a stage writes: what it is, what it came from, how to reproduce it."""
    from dataclasses import asdict, is_dataclass

    config = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    seed = config.get("train", {}).get("seed", config.get("seed"))
    return Meta(kind=kind, base_model=base_model, base_fingerprint=base_fingerprint, base_checkpoint=base_checkpoint,
                stage=stage, sparsity=sparsity, seed=seed, source=dict(source or {}),
                config=config, parents=list(parents), versions=library_versions())


def all_finite(tensor) -> bool:
    """No NaN or Inf in a floating-point torch tensor: one min/max pass (NaN propagates through both), no
    temporary bool tensor of its size."""
    import torch

    if not tensor.is_floating_point() or not tensor.numel():
        return True
    return all(map(math.isfinite, torch.aminmax(tensor.reshape(-1))))


def finite_data(data: np.ndarray, code: str) -> bool:
    """all_finite for a numpy view of data of safetensors dtype `code` (bfloat16 as uint16): the native
    kernel's pass for the dtypes it reads (which falls back to numpy's itself), numpy's for the others."""
    return native.all_finite(data) if code in ("F32", "F16", "BF16") else finite_array(data, code)


# --------------------------------------------------------------------------- writing

class TensorFileWriter:
    """Streams tensors into a safetensors file, atomically: `layout` fixes every key's dtype and shape up
    front, so the header is written first and each tensor's bytes follow as they come (whole, or in pieces
    with write_pieces: a tensor larger than memory never has to be held). The data goes to a temporary file
    beside `path`, renamed into place only when complete, so a killed process never leaves a truncated file.
    Each tensor's bytes are hashed (stored.tensor_digest) as they are written, `checksums` holding them at the end, and
    refused if they hold NaN or Inf; checked=False skips both (a model's shards, checked by their writer).

    with TensorFileWriter(path, layout) as w:
        for key, tensor in ...: w.write(key, tensor)
    """

    def __init__(self, path: str | Path, layout: dict[str, tuple[object, tuple[int, ...]]], checked: bool = True):
        """layout: key -> (dtype, shape), the dtype torch's, numpy's or safetensors' name ("BF16")."""
        self.path, self.checked = Path(path), checked
        self.layout = {key: (dtype_code(dtype), tuple(shape)) for key, (dtype, shape) in layout.items()}
        self._keys = list(layout)
        self.checksums: dict[str, str] = {}

    def metadata(self) -> dict[str, str]:
        """The header's __metadata__ (subclasses add theirs; must keep its length once written)."""
        return {"format": "pt"}

    def _header(self) -> bytes:
        # no sort_keys: keys keep the layout's (model) order, which Artifact.names reports
        header: dict = {"__metadata__": self.metadata()}
        offset = 0
        for key, (code, shape) in self.layout.items():
            size = math.prod(shape) * NUMPY_DTYPES[code].itemsize
            header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    def _error(self, err: OSError) -> LotaError:
        return LotaError(f"could not write {self.path}: {err.strerror or err}; make sure {self.path.parent} is a "
                         "writable directory with free space (or choose another out=)")

    def __enter__(self):
        self._tmp, self._out, self._fd, self._patches = None, None, None, []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self._tmp = Path(tmp)
            header = self._header()
            self._header_size = len(header)
            size = 8 + len(header) + sum(math.prod(shape) * NUMPY_DTYPES[code].itemsize
                                         for code, shape in self.layout.values())
            self._out = SequentialFile(self._fd, direct=size >= sequential.DIRECT_MIN)
            self._out.write(struct.pack("<Q", len(header)) + header)
        except OSError as err:
            self._discard()
            raise self._error(err) from err
        return self

    def _discard(self) -> None:
        if self._out is not None:
            self._out.abandon()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def write(self, key: str, tensor) -> None:
        """Tensor `key` whole (a torch tensor or a numpy array; bfloat16 as uint16), in layout order."""
        expected = self.layout.get(key)
        if expected is None or (_piece_code(tensor, expected[0]), tuple(tensor.shape)) != expected:
            raise ValueError(f"writing {key} {tensor.dtype} {tuple(tensor.shape)} out of layout {expected}")
        self.write_pieces(key, [tensor])

    def _begin(self, key: str) -> tuple[str, int]:
        """(dtype, entries) of `key`, which must be the next tensor of the layout."""
        if len(self.checksums) >= len(self._keys) or key != self._keys[len(self.checksums)]:
            raise ValueError(f"writing {key} out of layout order")
        dtype, shape = self.layout[key]
        return dtype, math.prod(shape)

    def write_pieces(self, key: str, pieces: Iterable) -> None:
        """Tensor `key` as consecutive flat pieces of its dtype (row-major order), in layout order: torch
        tensors or numpy arrays (bfloat16 as uint16)."""
        code, numel = self._begin(key)
        digest, written = tensor_digest(), 0
        for piece in pieces:
            if _piece_code(piece, code) != code:
                raise ValueError(f"writing {key}: a {piece.dtype} piece into a {_NAMES[code]} tensor")
            data = as_numpy(piece).view(np.uint8)
            if self.checked and not finite_data(data.view(NUMPY_DTYPES[code]), code):
                raise LotaError(f"refusing to write {self.path}: tensor {key!r} holds NaN or Inf values (the run "
                                f"diverged, or {_NAMES[code]} cannot hold them); lower the learning rate or write "
                                "float32")
            if self.checked:
                digest.update(data)
            self._out.write(data)
            written += data.size // NUMPY_DTYPES[code].itemsize
        if written != numel:
            raise ValueError(f"writing {key}: {written} entries of {numel}")
        self.checksums[key] = digest.hexdigest() if self.checked else ""

    def regions(self, key: str, entries: int) -> Iterator[tuple[int, np.ndarray]]:
        """Tensor `key` (the next of the layout) filled in place: (start, a writable flat numpy view of its
        entries [start, start + entries) in the file's own buffer; bfloat16 as uint16), one after another;
        what a view holds when the caller asks for the next is what the file gets. No copy is made: a merge
        reads base weights straight into the view and adds the deltas there. For unchecked files only (a
        model's shards): the caller checks what it fills in."""
        if self.checked:
            raise ValueError("regions are filled unseen by the writer: only for unchecked files")
        code, numel = self._begin(key)
        as_numpy = NUMPY_DTYPES[code]
        for start in range(0, numel, entries):
            count = min(entries, numel - start)
            yield start, np.frombuffer(self._out.reserve(count * as_numpy.itemsize), dtype=as_numpy)
        self.checksums[key] = ""

    def _finish(self) -> None:
        """Called once every tensor is written, before the file is synced and renamed (header rewrites)."""

    def _rewrite_header(self) -> None:
        header = self._header()
        if len(header) != self._header_size:
            raise AssertionError("a header rewrite must keep its length")
        self._patches.append((8, header))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if len(self.checksums) != len(self.layout):
                    raise ValueError(f"{self.path}: {len(self.layout) - len(self.checksums)} tensors unwritten")
                self._finish()
                out, self._out = self._out, None
                out.close(tuple(self._patches))
                os.close(self._fd)
                self._fd = None
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

    def __init__(self, path: str | Path, meta: Meta, layout: dict[str, tuple[object, tuple[int, ...]]]):
        if meta.kind not in KINDS:
            raise ValueError(f"unknown artifact kind {meta.kind!r}")
        super().__init__(path, layout)
        self.meta = meta
        width = 2 * tensor_digest().digest_size
        meta.checksums = {key: "0" * width for key in layout}  # placeholders of the final width
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


def save_dense(path, meta: Meta, tensors: dict) -> Path:
    """Write a task vector (dense torch tensors, or numpy arrays, under their own names)."""
    meta.shapes = {n: list(t.shape) for n, t in tensors.items()}
    with ArtifactWriter(path, meta, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}) as w:
        for name, tensor in tensors.items():
            w.write(name, tensor)
    return Path(path)


def save_sparse(path, meta: Meta, shapes: dict[str, tuple[int, ...]], positions: dict[str, tuple[str, object]],
                values: dict | None = None) -> Path:
    """Write a mask (positions only) or a sparse delta (positions and values).

    positions: name -> ('bits' | 'idx', array), as masks.encode_positions returns; arrays and values are
    torch tensors or numpy arrays.
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

class Artifact(StoredFile):
    """A lota artifact opened lazily (memory-mapped); tensors are read one at a time: as torch tensors by the
    methods below (torch imported on first use), as numpy arrays by StoredFile's and by `raw`."""

    def raw(self, key: str) -> "StoredTensor":
        """One stored tensor, read lazily: index it (`[:]`, `[a:b]`) like a safetensors slice, or stream it
        in flat pieces with `mapped` (what masks.top_k_mask does)."""
        return StoredTensor(self, key)

    def _checked(self, key: str):
        """A whole (small) stored tensor of a mask or sparse delta, its bytes checked against the checksum
        recorded when it was written: a flipped bit in a position or a value is caught, not used."""
        return as_torch(self.array(key).copy(), self.stored_dtype(key)).view(tuple(self._entries[key]["shape"]))

    def bits(self, name: str):
        """Packed bits (a uint8 torch tensor) of the positions this artifact holds for `name` (dense task
        vectors: nonzeros)."""
        return as_torch(np.require(self.packed_bits(name), requirements="W"), "U8")  # a copy where mapped

    def indices(self, name: str):
        """Sorted flat positions held for `name`; stored positions must lie in the tensor and strictly
        increase (a duplicate would add its value twice in one stage and once in another)."""
        if f"{name}::idx" in self.keys:
            return as_torch(self.positions(name).copy(), self.stored_dtype(f"{name}::idx"))
        return indices_from_bits(self.bits(name), self.numel(name))

    def values(self, name: str):
        """A sparse delta's values for `name` (in position order, as stored), refused if any is NaN or Inf."""
        return as_torch(self.values_array(name).copy(), self.stored_dtype(f"{name}::values"))

    def held(self, name: str):
        """A sparse delta's (flat bool mask of held entries, values in row-major order of the mask), refused
        when the counts differ."""
        mask = unpack_bits(self.bits(name), self.numel(name))
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
            out.masked_fill_(unpack_bits(self.bits(name), self.numel(name)), 1)
        elif f"{name}::bits" in self.keys:  # values fill the set bits in row-major order: no positions needed
            mask, values = self.held(name)
            out.masked_scatter_(mask, values.to(dtype))
        else:
            out[self.indices(name).long()] = self.values(name).to(dtype)
        return out.view(self.shape(name))

    def items(self, dtype=None) -> Iterator[tuple[str, object]]:
        for name in self.names:
            yield name, self.dense(name, dtype)


class StoredTensor:
    """A tensor of an Artifact, not yet read. Indexing (`[:]`, `[a:b]`, rows) copies out what it selects, as
    a torch tensor; `mapped(start, stop)` gives flat entries [start, stop) as a numpy array over a private
    memory map (see mapped_range). dtype: its safetensors name ("F32", "BF16": numpy holds it as uint16)."""

    def __init__(self, artifact: "Artifact", key: str):
        self._artifact, self.key = artifact, key
        entry = artifact._entries[key]
        self.dtype = entry["dtype"]
        self.shape = tuple(entry["shape"])
        self._itemsize = NUMPY_DTYPES[self.dtype].itemsize
        self._offset = artifact._data_start + entry["data_offsets"][0]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.dtype

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
        return mapped_range(self._artifact._fh, self._offset + start * self._itemsize, stop - start, self.dtype)


@contextlib.contextmanager
def mapped_range(file, offset: int, count: int, code: str) -> Iterator[np.ndarray]:
    """`count` entries of safetensors dtype `code` at byte `offset` of `file` (an open binary file or a path),
    as a numpy array (bfloat16 as uint16) over a private memory map of just that range, unmapped again on
    leaving the `with`: streaming a large file through it in pieces holds one piece in the process (resident
    set), not every page read so far, and copies nothing (the first pass over a piece reads the page cache
    directly)."""
    dtype = NUMPY_DTYPES[code]
    if count == 0:
        yield np.empty(0, dtype=dtype)
        return
    with contextlib.ExitStack() as stack:
        fh = file if hasattr(file, "fileno") else stack.enter_context(open(file, "rb"))
        # ACCESS_COPY: a private mapping, so the buffer is writable (torch wants that, or it warns) and a
        # write could never reach the file; pages are shared with the page cache until written
        region, lead = map_bytes(fh.fileno(), offset, count * dtype.itemsize, access=mmap.ACCESS_COPY)
    view = np.frombuffer(region, dtype=dtype, count=count, offset=lead)
    try:
        yield view
    finally:
        del view
        try:
            region.close()
        except BufferError:  # the caller kept a view: the mapping goes when that is freed
            pass


def open_artifact(path: str | Path, kinds: tuple[str, ...] = KINDS) -> Artifact:
    """What the stages read wherever they take artifacts: an artifact file, or a PEFT sparse adapter (its
    directory or its adapter_model.safetensors) converted on read into a sparse delta (lota_cli.peft_io)."""
    if is_adapter(path):
        from lota_cli import peft_io

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
