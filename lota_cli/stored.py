"""What a lota artifact file says about itself, read without torch: the safetensors header and lota's
metadata (checked: well-formed, complete, its SHA-256), each stored tensor as a read-only numpy view of the
file with its checksum checked, `verify`, and the counts `lota info` reports. `lota_cli.artifacts.Artifact`
builds the torch side on this, so commands that only inspect files (`lota info`) start without torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from lota_cli import LotaError

# 2: per-tensor checksums (SHA-256), and the fingerprint computed from them; 3: the checksums are XXH3-128,
# which hashes 8.7 GB/s here against SHA-256's 1.4 (a merge at 8B reads 7 GB of deltas, each checked)
FORMAT_VERSION = 3
KINDS = ("task_vector", "mask", "sparse_delta")
MADE_BY = {"task_vector": "calibrate or merge", "mask": "extract", "sparse_delta": "sparse-train or lotto"}
_NO_FINGERPRINT = "0" * 64
VERIFY_CHUNK = 1 << 24  # entries hashed per piece by StoredFile.verify

NUMPY_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                 "BF16": np.dtype(np.uint16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
                 "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}


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
    checksums: dict[str, str] = field(default_factory=dict)  # key -> tensor_digest of its data; empty in format 1
    # the base's weights as saved, fingerprinted in name order (models.saved_fingerprint): checkable from the
    # base's shards alone; empty where unknown
    base_checkpoint: str = ""
    # a mask's: what ranked its entries, {"name": extract.source, ...what makes it reproducible}; empty where
    # not recorded (other kinds, lotto's masks, older masks)
    source: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def tensor_digest(fmt: int = FORMAT_VERSION):
    """A new hash of a tensor's bytes as artifacts of format `fmt` record it (XXH3-128 from format 3, SHA-256
    in format 2): detects a damaged copy, which is what the checksums are for, not a forger."""
    return xxhash.xxh3_128() if fmt >= 3 else hashlib.sha256()


def tensors_fingerprint(checksums: dict[str, str]) -> str:
    """An artifact's fingerprint (format 2 on): SHA-256 over its keys and their data's checksums, in file order."""
    digest = hashlib.sha256()
    for key, checksum in checksums.items():
        digest.update(f"{key}:{checksum};".encode())
    return digest.hexdigest()


def finite_array(array: np.ndarray, stored: str) -> bool:
    """all_finite for a numpy view of stored data (`stored`: its safetensors dtype; bfloat16 as uint16)."""
    if not array.size or stored not in ("F64", "F32", "F16", "BF16"):
        return True
    if stored == "BF16":  # the exponent's bits all set: Inf or NaN
        return int(np.bitwise_and(array, 0x7FFF).max()) < 0x7F80
    return math.isfinite(array.min()) and math.isfinite(array.max())  # NaN propagates through both


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
    """models.fingerprint over (name, shape, flat tensor) in state_dict order: a SHA-256 of the names, shapes
    and a strided sample of each tensor's values as bfloat16. A flat tensor is a torch tensor, or a numpy view
    of a memory-mapped file (bfloat16 as uint16), of which only the sampled entries are read."""
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


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcounts(array: np.ndarray) -> np.ndarray:
    """Set bits of each element (uint8 counts)."""
    return np.bitwise_count(array) if hasattr(np, "bitwise_count") else _POPCOUNT[array]  # numpy >= 2


def count_bits(bits) -> int:
    """Number of set entries in packed bits (a numpy array, or a tensor: anything with .numpy()), without
    unpacking them."""
    bits = bits.numpy() if hasattr(bits, "numpy") else bits
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


def layer_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'layer 3'; names without a layer number keep their own."""
    match = re.search(r"\.(\d+)\.", name)
    return f"layer {int(match.group(1))}" if match else name


def density_by_layer(counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Per-layer density from per-tensor (selected, total) counts, layers in order of appearance."""
    layers: dict[str, list[int]] = {}
    for name, (held, total) in counts.items():
        acc = layers.setdefault(layer_of(name), [0, 0])
        acc[0] += held
        acc[1] += total
    return {layer: held / max(total, 1) for layer, (held, total) in layers.items()}


def _nonzero(data: np.ndarray, stored: str) -> np.ndarray:
    """Which entries of stored data (bfloat16 as uint16) are not 0; -0.0 is 0."""
    if stored in ("BF16", "F16"):  # the sign bit masked off
        return np.bitwise_and(data.view(np.uint16), 0x7FFF) != 0
    return data != 0


def _signs(data: np.ndarray, stored: str) -> np.ndarray:
    """-1, 0 or 1 (int8) per entry of stored floating-point data (bfloat16 as uint16); -0.0 is 0."""
    if stored in ("BF16", "F16"):  # the sign bit, where the rest is not all zero
        return np.where(_nonzero(data, stored), np.where(data.view(np.uint16) >> 15, -1, 1), 0).astype(np.int8)
    return np.sign(data).astype(np.int8)


def map_bytes(fileno: int, offset: int, length: int, **options) -> tuple[mmap.mmap, int]:
    """A memory map of `length` bytes of a file from byte `offset` (mmap's own alignment kept), and where
    those bytes begin in it; `options` are mmap's (flags, prot, access). length > 0."""
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    return mmap.mmap(fileno, offset - aligned + length, offset=aligned, **options), offset - aligned


def will_need(fileno: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading `length` bytes of a file into the page cache now, without waiting: from
    a disk, what is read next arrives while the current work goes on. Where the system cannot, nothing."""
    try:
        os.posix_fadvise(fileno, offset, length, os.POSIX_FADV_WILLNEED)
    except (AttributeError, OSError):
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


def _check_data_layout(path: Path, entries: dict) -> None:
    """Each tensor's bytes are its shape times its dtype's size, the tensors laid end to end from offset 0
    (what safetensors itself requires), in a dtype lota reads."""
    at = 0
    for key, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        dtype = NUMPY_DTYPES.get(entry["dtype"])
        if dtype is None or begin != at or end - begin != math.prod(entry["shape"]) * dtype.itemsize:
            raise LotaError(f"{path} is not a readable safetensors file: tensor {key!r} has "
                            f"{'an unknown dtype' if dtype is None else 'data offsets that do not match its shape'} "
                            "(damaged); re-create it or copy it again")
        at = end


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter(path) -> bool:
    """A directory, or a file named adapter_model.safetensors: what peft_io.read_adapter reads."""
    path = Path(path)
    return path.is_dir() or path.name == ADAPTER_WEIGHTS


def open_stored(path: str | Path, kinds: tuple[str, ...] = KINDS) -> "StoredFile":
    """What inspecting stages read: an artifact file, without torch; a PEFT adapter, converted on read into a
    sparse delta (artifacts.open_artifact, which needs torch)."""
    if is_adapter(path):
        from lota_cli.artifacts import open_artifact

        return open_artifact(path, kinds)
    return StoredFile(path, kinds)


def _digest_of(array: np.ndarray, fmt: int) -> str:
    digest = tensor_digest(fmt)
    digest.update(array.view(np.uint8))
    return digest.hexdigest()


class StoredFile:
    """A lota artifact's header, metadata and stored tensors (numpy views), opened and checked at once:
    a file that is not a complete, well-formed lota artifact of one of `kinds` is refused in one line."""

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
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        _check_data_layout(self.path, self._entries)
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

    def _mapping(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat entries [start, stop) of stored tensor `key` as a read-only view of the file (a populated
        private mapping of just those bytes, freed with the last view of it; bfloat16 as uint16)."""
        entry = self._entries[key]
        dtype = NUMPY_DTYPES[entry["dtype"]]
        stop = math.prod(entry["shape"]) if stop is None else stop
        offset = self._data_start + entry["data_offsets"][0] + start * dtype.itemsize
        length = (stop - start) * dtype.itemsize
        if not length:
            return np.empty(0, dtype)
        region, lead = map_bytes(self._fh.fileno(), offset, length, prot=mmap.PROT_READ,
                                 flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0))
        return np.frombuffer(region, dtype=dtype, count=stop - start, offset=lead)

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
        if expected and _digest_of(array, self.meta.format) != expected:
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
                count += int(np.count_nonzero(_nonzero(self._mapping(name, start, min(numel, start + VERIFY_CHUNK)),
                                                       stored)))
            return count
        if f"{name}::bits" in self.keys:
            return count_bits(self.array(f"{name}::bits"))
        return self.positions(name).size

    def held_mask(self, name: str) -> np.ndarray:
        """The entries of `name` this artifact holds, as a flat bool array (task vectors: the nonzero ones)."""
        if self.kind == "task_vector":
            return _nonzero(self._mapping(name), self.stored_dtype(name))
        if f"{name}::bits" in self.keys:
            return np.unpackbits(self.array(f"{name}::bits"), count=self.numel(name), bitorder="little").view(np.bool_)
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
        if check_finite and not finite_array(values, self.stored_dtype(key)):
            raise self.nonfinite_values(name)
        return values

    def nonfinite_values(self, name: str) -> LotaError:
        return LotaError(f"{self.path}: tensor {name!r} holds NaN or Inf values; the run that made it diverged or "
                         "the file is damaged: re-create it")

    def support(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(the entries of `name` held, a flat bool array; the sign of every entry's delta, -1, 0 or 1 as int8,
        or None for a mask, which carries no values): what `lota overlap` compares."""
        if self.kind == "task_vector":
            signs = _signs(self._mapping(name), self.stored_dtype(name))
            return signs != 0, signs
        held = self.held_mask(name)
        if self.kind == "mask":
            return held, None
        signs = np.zeros(held.size, dtype=np.int8)
        signs[held] = _signs(self.values_array(name), self.stored_dtype(f"{name}::values"))
        return held, signs

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
        fingerprint (""): its tensor names and shapes are what is checked against the base (peft_io)."""
        if self.meta.base_fingerprint and fingerprint and self.meta.base_fingerprint != fingerprint:
            raise LotaError(
                f"{self.path} was made from base {self.meta.base_model!r} (fingerprint "
                f"{self.meta.base_fingerprint[:12]}), but the base here is {base_model!r} (fingerprint "
                f"{fingerprint[:12]}); use artifacts made from this base model"
            )
