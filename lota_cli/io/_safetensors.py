"""safetensors files read and written tensor by tensor: the header read and checked (well-formed, complete,
offsets that match shapes) before anything is mapped, and a writer that streams each tensor's bytes after a
header written first, into a temporary file renamed into place only when complete."""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lota_cli import LotaError, native
from lota_cli.io._files import write_error
from lota_cli.io._sequential import DIRECT_MIN, SequentialFile
from lota_cli.tensors import as_numpy, dtype_code, dtype_name, is_code, itemsize, nonfinite, numpy_dtype


def damaged(path: Path, why: str) -> LotaError:
    return LotaError(f"{path} is not a readable safetensors file: {why}; re-create it or copy it again")


def read_header(path: Path) -> tuple[dict, bytes]:
    """The parsed safetensors header and its raw bytes, refusing anything that is not a well-formed one."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise damaged(path, f"it is only {size} bytes long (truncated?)")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise damaged(path, f"the header length {n:,} exceeds the file's {size:,} bytes (damaged or truncated)")
            raw = f.read(n)
    except OSError as err:
        raise LotaError(f"cannot read {path}: {err.strerror or err}; check that the file is readable") from err
    try:
        header = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        raise damaged(path, "its header is not valid JSON (damaged)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise damaged(path, "its header is not a JSON object of tensors (damaged)")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(v, int) and v >= 0 for v in info["shape"] + info["data_offsets"]))
        if not ok:
            raise damaged(path, f"the header entry of tensor {key!r} is malformed (damaged)")
    return header, raw


def check_complete(path: Path, header: dict, n: int) -> None:
    """Catch truncated files before they are mapped: the header's data size must match the file's."""
    size = path.stat().st_size
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        what = "truncated" if size < 8 + n + end else "corrupt (it has bytes past its data)"
        raise LotaError(f"{path} is {what}: header promises {8 + n + end:,} bytes, file has "
                        f"{size:,}; re-create it or copy it again")


def check_data_layout(path: Path, entries: dict) -> None:
    """Each tensor's bytes are its shape times its dtype's size, the tensors laid end to end from offset 0
    (what safetensors itself requires), in a dtype lota reads."""
    at = 0
    for key, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        known = is_code(entry["dtype"])
        if not known or begin != at or end - begin != math.prod(entry["shape"]) * itemsize(entry["dtype"]):
            raise damaged(path, f"tensor {key!r} has "
                          f"{'data offsets that do not match its shape' if known else 'an unknown dtype'} (damaged)")
        at = end


def _piece_code(piece, code: str) -> str:
    """The safetensors dtype of a piece written as `code`: a numpy uint16 piece is bfloat16 where one is due."""
    if isinstance(piece, np.ndarray) and piece.dtype == np.uint16 and code == "BF16":
        return code
    return dtype_code(piece.dtype)


class TensorFileWriter:
    """Streams tensors into a safetensors file, atomically: `layout` fixes every key's dtype and shape up
    front, so the header is written first and each tensor's bytes follow as they come (whole, or in pieces
    with write_pieces: a tensor larger than memory never has to be held). The data goes to a temporary file
    beside `path`, renamed into place only when complete, so a killed process never leaves a truncated file.

    digest: a factory of hash objects (an artifact's tensor checksum). Given one, the file is checked: each
    tensor's bytes are hashed as they are written (`checksums` holds the digests at the end) and refused if
    they hold NaN or Inf. Without, nothing is checked (a model's shards, whose writer checks what it fills in).

    with TensorFileWriter(path, layout) as w:
        for key, tensor in ...: w.write(key, tensor)
    """

    def __init__(self, path: str | Path, layout: dict[str, tuple[object, tuple[int, ...]]],
                 digest: Callable[[], object] | None = None):
        """layout: key -> (dtype, shape), the dtype torch's, numpy's or safetensors' name ("BF16")."""
        self.path, self.digest = Path(path), digest
        self.layout = {key: (dtype_code(dtype), tuple(shape)) for key, (dtype, shape) in layout.items()}
        self._keys = list(layout)
        self.checksums: dict[str, str] = {}

    def metadata(self) -> dict[str, str]:
        """The header's __metadata__ (subclasses add theirs; must keep its length once written)."""
        return {"format": "pt"}

    def header(self) -> bytes:
        """The header's bytes as they are now (padded to 8)."""
        # no sort_keys: keys keep the layout's (model) order, which an artifact's names report
        header: dict = {"__metadata__": self.metadata()}
        offset = 0
        for key, (code, shape) in self.layout.items():
            size = math.prod(shape) * itemsize(code)
            header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    def _error(self, err: OSError) -> LotaError:
        return write_error(self.path, err)

    def __enter__(self):
        self._tmp, self._out, self._fd, self._patches = None, None, None, []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self._tmp = Path(tmp)
            header = self.header()
            self._header_size = len(header)
            size = 8 + len(header) + sum(math.prod(shape) * itemsize(code) for code, shape in self.layout.values())
            self._out = SequentialFile(self._fd, direct=size >= DIRECT_MIN)
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
        digest, written = self.digest() if self.digest else None, 0
        for piece in pieces:
            if _piece_code(piece, code) != code:
                raise ValueError(f"writing {key}: a {piece.dtype} piece into a {dtype_name(code)} tensor")
            data = as_numpy(piece).view(np.uint8)
            if digest is not None:
                if not native.all_finite(data.view(numpy_dtype(code)), code):
                    raise nonfinite(f"refusing to write {self.path}: tensor {key!r}",
                                    f"the run diverged, or {dtype_name(code)} cannot hold them: lower the learning "
                                    "rate or write float32")
                digest.update(data)
            self._out.write(data)
            written += data.size // itemsize(code)
        if written != numel:
            raise ValueError(f"writing {key}: {written} entries of {numel}")
        self.checksums[key] = digest.hexdigest() if digest is not None else ""

    def regions(self, key: str, entries: int) -> Iterator[tuple[int, np.ndarray]]:
        """Tensor `key` (the next of the layout) filled in place: (start, a writable flat numpy view of its
        entries [start, start + entries) in the file's own buffer; bfloat16 as uint16), one after another;
        what a view holds when the caller asks for the next is what the file gets. No copy is made: a merge
        reads base weights straight into the view and adds the deltas there. For unchecked files only (a
        model's shards): the caller checks what it fills in."""
        if self.digest is not None:
            raise ValueError("regions are filled unseen by the writer: only for unchecked files")
        code, numel = self._begin(key)
        dtype = numpy_dtype(code)
        for start in range(0, numel, entries):
            count = min(entries, numel - start)
            yield start, np.frombuffer(self._out.reserve(count * dtype.itemsize), dtype=dtype)
        self.checksums[key] = ""

    def before_close(self) -> None:
        """Called once every tensor is written, before the file is synced and renamed (for header rewrites)."""

    def rewrite_header(self) -> None:
        """Write the header again, as it is now (it must keep its length), when the file is closed."""
        header = self.header()
        if len(header) != self._header_size:
            raise AssertionError("a header rewrite must keep its length")
        self._patches.append((8, header))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if len(self.checksums) != len(self.layout):
                    raise ValueError(f"{self.path}: {len(self.layout) - len(self.checksums)} tensors unwritten")
                self.before_close()
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
