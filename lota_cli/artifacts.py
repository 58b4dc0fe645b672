"""Artifacts: one safetensors file each, with lota's metadata in the header.

Kinds:
  task_vector   dense delta per tensor, stored under the parameter name
  mask          selected positions per tensor: `NAME::bits` (packed, 1 bit/entry) or `NAME::idx` (int32
                positions), whichever is smaller
  sparse_delta  a mask plus `NAME::values`, the delta at the selected positions in row-major order

Files are written by streaming tensor by tensor into a temporary file beside the target, which is renamed
into place only when complete: a killed stage never leaves a truncated artifact behind. The header records
the base model and a fingerprint of its weights, so a stage can refuse an artifact made from another base.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from lota_cli import LotaError, __version__
from lota_cli.masks import indices_from_bits, unpack_bits

FORMAT_VERSION = 1
KINDS = ("task_vector", "mask", "sparse_delta")
MADE_BY = {"task_vector": "calibrate or merge", "mask": "extract", "sparse_delta": "sparse-train or lotto"}
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_NO_FINGERPRINT = "0" * 64


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

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def library_versions() -> dict[str, str]:
    import transformers

    return {"lota": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def stage_meta(kind: str, stage: str, cfg, base_model: str, base_fingerprint: str, parents: list[str] = (),
               sparsity: float | None = None) -> Meta:
    """Metadata for an artifact a stage writes: what it is, what it came from, how to reproduce it."""
    from dataclasses import asdict, is_dataclass

    config = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    seed = config.get("train", {}).get("seed", config.get("seed"))
    return Meta(kind=kind, base_model=base_model, base_fingerprint=base_fingerprint,
                stage=stage, sparsity=sparsity, seed=seed,
                config=config, parents=list(parents), versions=library_versions())


# --------------------------------------------------------------------------- writing

class ArtifactWriter:
    """Streams tensors into a safetensors file; `layout` fixes every key's dtype and shape up front.

    with ArtifactWriter(path, meta, layout) as w:
        for key, tensor in ...: w.write(key, tensor)
    """

    def __init__(self, path: str | Path, meta: Meta, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        if meta.kind not in KINDS:
            raise ValueError(f"unknown artifact kind {meta.kind!r}")
        self.path, self.meta, self.layout = Path(path), meta, layout
        self._hash = hashlib.sha256()
        self._written: list[str] = []

    def _header(self) -> bytes:
        header: dict = {"__metadata__": {"format": "pt", "lota": json.dumps(asdict(self.meta), sort_keys=True)}}
        offset = 0
        for key, (dtype, shape) in self.layout.items():
            size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    def __enter__(self) -> "ArtifactWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp, self._file = Path(tmp), os.fdopen(fd, "wb")
        header = self._header()
        self._file.write(struct.pack("<Q", len(header)) + header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.layout[key]
        if key != list(self.layout)[len(self._written)] or (tensor.dtype, tuple(tensor.shape)) != expected:
            raise ValueError(f"writing {key} {tensor.dtype} {tuple(tensor.shape)} out of layout {expected}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._hash.update(key.encode())
        self._hash.update(data)
        self._file.write(data)
        self._written.append(key)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if len(self._written) != len(self.layout):
                    raise ValueError(f"artifact {self.path}: {len(self.layout) - len(self._written)} tensors unwritten")
                self.meta.fingerprint = self._hash.hexdigest()
                header = self._header()  # same length: only the fixed-width fingerprint changed
                self._file.seek(8)
                self._file.write(header)
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        except OSError as err:
            raise LotaError(f"could not write {self.path}: {err.strerror or err}") from err
        finally:
            self._file.close()
            self._tmp.unlink(missing_ok=True)


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
        if not self.path.is_file():
            raise LotaError(f"artifact not found: {self.path}")
        _check_complete(self.path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
            header = self._file.metadata() or {}
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise LotaError(f"{self.path} is not a readable safetensors file ({err}); was it truncated?") from err
        if "lota" not in header:
            raise LotaError(f"{self.path} is a safetensors file but not a lota artifact (no 'lota' metadata)")
        self.meta = Meta(**json.loads(header["lota"]))
        if self.meta.format > FORMAT_VERSION:
            raise LotaError(f"{self.path} uses artifact format {self.meta.format}; this lota reads up to "
                            f"{FORMAT_VERSION}: upgrade lota")
        if self.meta.kind not in kinds:
            wanted = " or ".join(f"a {k} (made by {MADE_BY[k]})" for k in kinds)
            raise LotaError(f"{self.path} is a {self.meta.kind}; this stage needs {wanted}")
        self.keys = set(self._file.keys())

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

    def raw(self, key: str):
        """A safetensors slice: index it (`[:]`, `[a:b]`) to read."""
        return self._file.get_slice(key)

    def bits(self, name: str) -> torch.Tensor:
        """Packed bits of the positions this artifact holds for `name` (dense task vectors: nonzeros)."""
        from lota_cli.masks import pack_bits

        if self.kind == "task_vector":
            return pack_bits(self._file.get_tensor(name).reshape(-1) != 0)
        if f"{name}::bits" in self.keys:
            return self._file.get_tensor(f"{name}::bits")
        mask = torch.zeros(self.numel(name), dtype=torch.bool)
        mask[self._file.get_tensor(f"{name}::idx").long()] = True
        return pack_bits(mask)

    def indices(self, name: str) -> torch.Tensor:
        """Sorted flat positions held for `name`."""
        if f"{name}::idx" in self.keys:
            return self._file.get_tensor(f"{name}::idx")
        return indices_from_bits(self.bits(name), self.numel(name))

    def values(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(f"{name}::values")

    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor as a dense delta (masks: 1.0 at selected positions)."""
        if self.kind == "task_vector":
            return self._file.get_tensor(name).to(dtype)
        out = torch.zeros(self.numel(name), dtype=dtype)
        if self.kind == "mask":
            out[unpack_bits(self.bits(name), self.numel(name))] = 1
        else:
            out[self.indices(name).long()] = self.values(name).to(dtype)
        return out.view(self.shape(name))

    def items(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.dense(name, dtype)

    def density(self, name: str | None = None) -> float:
        names = [name] if name else self.names
        total = sum(self.numel(n) for n in names)
        held = sum(int(unpack_bits(self.bits(n), self.numel(n)).count_nonzero()) for n in names)
        return held / max(total, 1)

    def check_base(self, fingerprint: str, base_model: str) -> None:
        """Refuse an artifact made from another base model."""
        if self.meta.base_fingerprint != fingerprint:
            raise LotaError(
                f"{self.path} was made from base {self.meta.base_model!r} (fingerprint "
                f"{self.meta.base_fingerprint[:12]}), but the base here is {base_model!r} (fingerprint "
                f"{fingerprint[:12]}); use artifacts made from this base model"
            )


def _check_complete(path: Path) -> None:
    """Catch truncated files before safetensors maps them: the header's data size must match the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise LotaError(f"{path} is not a readable safetensors file (damaged header); was it truncated?") from err
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise LotaError(f"{path} is truncated or corrupt: header promises {8 + n + end:,} bytes, file has "
                        f"{size:,}; re-create it or copy it again")


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
