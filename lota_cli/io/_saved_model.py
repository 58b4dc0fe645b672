"""A Hugging Face model directory's safetensors read and written tensor by tensor, never as a model object.

`SavedModel` opens a model directory's `model.safetensors` or the shards `model.safetensors.index.json`
names, and refuses at once (one line, before anything is written) a missing shard, a shard that is
truncated or not safetensors, or an index naming a tensor its shard does not hold. Tensor data is then read
in flat pieces through a small private memory map of just that range (io.mapped), so streaming
a 16 GB model keeps one piece resident, not every page read so far, or read straight into a writer's buffer
(read_into). `ShardedWriter` writes tensors into output shards of at most `shard_size` bytes plus the
index, as `save_pretrained` lays them out (each shard written front to back by io's SequentialFile), into a
temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from lota_cli import LotaError
from lota_cli.io._directories import atomic_directory
from lota_cli.io._files import write_text
from lota_cli.io._mapping import mapped, will_need
from lota_cli.io._safetensors import TensorFileWriter, check_complete, read_header
from lota_cli.tensors import dtype_code, fingerprint_of, itemsize, nonfinite

SINGLE = "model.safetensors"
DEFAULT_SHARD_SIZE = "5GB"  # the largest output shard unless told: save_pretrained's own default
INDEX = "model.safetensors.index.json"
_SUPPORTED = {"F32", "BF16", "F16"}  # the dtypes a checkpoint is streamed in


class SavedModel:
    """The tensors of a local model directory's safetensors: names in file order, shape, dtype,
    and their data in pieces."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        files = self._shard_files()
        self._where: dict[str, tuple[Path, dict, int]] = {}  # name -> (shard, header entry, data start)
        for shard, names in files.items():
            if not shard.is_file():
                raise LotaError(f"{self.directory / INDEX} names shard {shard.name}, which is missing; copy the "
                                "model again (all of its shards)")
            header, raw = read_header(shard)
            check_complete(shard, header, len(raw))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            for name in names if names is not None else entries:
                if name not in entries:
                    raise LotaError(f"{self.directory / INDEX} puts tensor {name!r} in {shard.name}, which does not "
                                    "hold it; the index and the shards are of different models: copy the model again")
                if entries[name]["dtype"] not in _SUPPORTED:
                    raise LotaError(f"{shard}: tensor {name!r} is stored as {entries[name]['dtype']}, which lota "
                                    "does not stream; give a model stored in float32, bfloat16 or float16")
                self._where[name] = (shard, entries[name], 8 + len(raw))
        self._files: dict[Path, object] = {}  # shards opened by read_into

    def _shard_files(self) -> dict[Path, list[str] | None]:
        """shard -> the tensor names the index puts there (None: a single file, all of its tensors)."""
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise LotaError(f"{index} is not a safetensors index (no weight_map); copy the model again") from None
            files: dict[Path, list[str]] = {}
            for name, shard in weight_map.items():
                files.setdefault(self.directory / shard, []).append(name)
            return files
        if (self.directory / SINGLE).is_file():
            return {self.directory / SINGLE: None}
        raise LotaError(f"{self.directory} holds neither {SINGLE} nor {INDEX}; give a model saved as safetensors")

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> str:
        """Its safetensors dtype ("F32", "BF16", "F16")."""
        return self._where[name][1]["dtype"]

    def itemsize(self, name: str) -> int:
        return itemsize(self.dtype(name))

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def location(self, name: str) -> tuple[Path, int]:
        """(shard, byte offset of `name`'s data in it)."""
        shard, entry, data_start = self._where[name]
        return shard, data_start + entry["data_offsets"][0]

    def mapped(self, name: str, start: int = 0, stop: int | None = None):
        """Flat entries [start, stop) of `name` as a numpy array (bfloat16 as uint16) over a private memory map
        (valid inside the `with`)."""
        shard, offset = self.location(name)
        stop = self.numel(name) if stop is None else stop
        return mapped(shard, offset + start * self.itemsize(name), stop - start, self.dtype(name))

    def flat_tensors(self, sources: Mapping[str, str]) -> Iterator[tuple[str, tuple[int, ...], np.ndarray]]:
        """(name, shape, flat memory-mapped array) for each name -> checkpoint tensor of `sources`, in its
        order, one mapping open at a time: what tensors.fingerprint_of reads a strided sample of."""
        for name, source in sources.items():
            with self.mapped(source) as flat:
                yield name, self.shape(source), flat

    def saved_fingerprint(self) -> str:
        """The fingerprint of the weights as saved (artifacts' base_checkpoint): every tensor, in name order,
        as models.model_saved_fingerprint computes it from a loaded model."""
        return fingerprint_of(self.flat_tensors({name: name for name in sorted(self.names)}))

    def nonfinite(self, name: str) -> LotaError:
        return nonfinite(f"model {str(self.directory)!r}: weight {name!r}",
                         "the model files are damaged or the model diverged: use an intact copy")

    def _file(self, shard: Path):
        if shard not in self._files:
            self._files[shard] = open(shard, "rb")
        return self._files[shard]

    def read_ahead(self, name: str) -> None:
        """Have tensor `name`'s bytes read from disk now (io.will_need), to be read later by read_into."""
        shard, offset = self.location(name)
        will_need(self._file(shard).fileno(), offset, self.numel(name) * self.itemsize(name))

    def read_into(self, name: str, start: int, out: np.ndarray) -> None:
        """The stored bytes of entries [start, start + out.size) of `name` (out's dtype of the same size as the
        tensor's) read into `out`: one copy from the page cache, no mapping."""
        shard, offset = self.location(name)
        fd = self._file(shard).fileno()
        view, at = memoryview(out).cast("B"), offset + start * self.itemsize(name)
        while view.nbytes:
            done = os.preadv(fd, [view], at)
            if done == 0:
                raise LotaError(f"{shard} ends inside tensor {name!r}; the file is truncated: copy it again")
            view, at = view[done:], at + done


class ShardedWriter:
    """Writes a model's tensors, in a given order, as safetensors shards of at most `shard_size` bytes (a
    tensor larger than that gets a shard of its own), plus `model.safetensors.index.json` when there is more
    than one, into a temporary directory beside `directory`, renamed into place when the `with` ends well.

    layout: name -> (dtype, shape), in the order the tensors will be written; a dtype is torch's, numpy's or
    safetensors' name.
    """

    def __init__(self, directory: str | Path, layout: dict[str, tuple[object, tuple[int, ...]]], shard_size: int):
        self.directory = Path(directory)
        self._layout = layout = {name: (dtype_code(dtype), tuple(shape)) for name, (dtype, shape) in layout.items()}
        self.groups: list[dict] = [{}]
        filled = 0
        for name, (dtype, shape) in layout.items():
            size = math.prod(shape) * itemsize(dtype)
            if self.groups[-1] and filled + size > shard_size:
                self.groups.append({})
                filled = 0
            self.groups[-1][name] = (dtype, shape)
            filled += size
        count = len(self.groups)
        self.files = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                  for i in range(count)]

    def __enter__(self) -> "ShardedWriter":
        self._directory = contextlib.ExitStack()
        self.tmp = self._directory.enter_context(atomic_directory(self.directory))
        self._shards = iter(zip(self.files, self.groups))
        self._writer = None
        self._left: list[str] = []  # the current shard's tensors still to be written, in order
        return self

    def write_pieces(self, name: str, pieces) -> None:
        self._next(name).write_pieces(name, pieces)
        self._left.pop(0)

    def regions(self, name: str, entries: int):
        """Tensor `name` filled in place, region by region (see TensorFileWriter.regions)."""
        writer = self._next(name)
        self._left.pop(0)
        yield from writer.regions(name, entries)

    def _next(self, name: str) -> TensorFileWriter:
        """The writer of the shard that `name`, the next tensor, goes into."""
        if not self._left:  # the next shard
            if self._writer is not None:
                self._writer.__exit__(None, None, None)
            file, group = next(self._shards)
            # no checksums (a model's shards have no lota metadata to keep them) and no finiteness check:
            # the caller checked what it read and what it changed
            self._writer = TensorFileWriter(self.tmp / file, group).__enter__()
            self._left = list(group)
        if name != self._left[0]:
            raise ValueError(f"writing {name} out of order (expected {self._left[0]})")
        return self._writer

    def copy_files(self, source: Path, skip: set[str]) -> None:
        """Copy the files of `source` other than `skip` (config, tokenizer, generation config, ...)."""
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in skip and not path.name.startswith("."):
                shutil.copy2(path, self.tmp / path.name)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._writer is not None:
                self._writer.__exit__(exc_type, exc, tb)
            if exc_type is None:
                if self._left or next(self._shards, None) is not None:
                    raise ValueError(f"{self.directory}: tensors left unwritten")
                if len(self.files) > 1:
                    weight_map = {name: file for file, group in zip(self.files, self.groups) for name in group}
                    total = sum(math.prod(s) * itemsize(d) for d, s in self._layout.values())
                    write_text(self.tmp / INDEX, json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}, indent=2) + "\n")
        except BaseException as err:
            self._directory.__exit__(type(err), err, err.__traceback__)  # the directory is discarded
            raise
        self._directory.__exit__(exc_type, exc, tb)  # renamed into place only if all went well


def local_directory(cfg) -> tuple[Path | None, str]:
    """The local directory holding model `cfg`'s safetensors (a hub id: its snapshot in the HF cache, fetched
    when online), or (None, why it cannot be streamed)."""
    if cfg.gguf_file:
        return None, "a GGUF file is dequantized on load"
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        if not (path / SINGLE).is_file() and not (path / INDEX).is_file():
            return None, "it has no safetensors checkpoint"
        return path, ""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.path, revision=cfg.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])), ""
    except Exception as err:  # offline without a cached copy, a missing repo: the model path says what is wrong
        return None, f"no local copy of {cfg.path} ({type(err).__name__})"
