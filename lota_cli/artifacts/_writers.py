"""Writing artifacts: streamed tensor by tensor into a temporary file beside the target, renamed into place
only when complete (io.TensorFileWriter), so a killed stage never leaves a truncated artifact behind; each
tensor's checksum computed as it is written, the header's own SHA-256 patched in at the end."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

from lota_cli import __version__
from lota_cli.artifacts._format import FORMAT_VERSION, KINDS, NO_FINGERPRINT, Meta, tensor_digest, tensors_fingerprint
from lota_cli.io import TensorFileWriter


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
    """Metadata for an artifact a stage writes: what it is, what it came from, how to reproduce it: the stage's
    config, less the keys it accepts but never reads (a preset's training settings, in extract)."""
    config = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    if is_dataclass(cfg):
        config = {f.name: config[f.name] for f in fields(cfg) if not f.metadata.get("unread")}
    seed = (config.get("train") or {}).get("seed", config.get("seed"))
    return Meta(kind=kind, base_model=base_model, base_fingerprint=base_fingerprint, base_checkpoint=base_checkpoint,
                stage=stage, sparsity=sparsity, seed=seed, source=dict(source or {}),
                config=config, parents=list(parents), versions=library_versions())


class ArtifactWriter(TensorFileWriter):
    """A TensorFileWriter whose header carries the artifact's Meta; at the end the metadata gains the
    per-tensor checksums, the artifact's fingerprint (a SHA-256 over the names and those checksums) and the
    SHA-256 of the header itself, written in place (fixed-width hex digests, so the header keeps its length)."""

    def __init__(self, path: str | Path, meta: Meta, layout: dict[str, tuple[object, tuple[int, ...]]]):
        if meta.kind not in KINDS:
            raise ValueError(f"unknown artifact kind {meta.kind!r}")
        super().__init__(path, layout, digest=tensor_digest)
        self.meta = meta
        width = 2 * tensor_digest().digest_size
        meta.checksums = {key: "0" * width for key in layout}  # placeholders of the final width
        meta.header_sha256 = NO_FINGERPRINT
        meta.format = FORMAT_VERSION

    def metadata(self) -> dict[str, str]:
        return {"format": "pt", "lota": json.dumps(asdict(self.meta))}

    def before_close(self) -> None:
        self.meta.checksums = dict(self.checksums)
        self.meta.fingerprint = tensors_fingerprint(self.checksums)
        self.meta.header_sha256 = NO_FINGERPRINT
        self.meta.header_sha256 = hashlib.sha256(self.header()).hexdigest()
        self.rewrite_header()


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

    positions: name -> ('bits' | 'idx', array), as tensors.encode_positions returns; arrays and values are
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
