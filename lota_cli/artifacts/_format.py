"""The artifact format: what a lota artifact's header says about it (Meta), and the checksums that guard it.

Kinds:
  task_vector   dense delta per tensor, stored under the parameter name
  mask          selected positions per tensor: `NAME::bits` (packed, 1 bit/entry) or `NAME::idx` (int32
                positions), whichever is smaller
  sparse_delta  a mask plus `NAME::values`, the delta at the selected positions in row-major order

The header records the base model and a fingerprint of its weights, so a stage can refuse an artifact made
from another base, and a SHA-256 of the header itself, so a flipped byte in the metadata (a shape, the kind,
the base) is caught when the file is opened rather than producing a wrong result later. Tensor data is
covered by a checksum per tensor (XXH3-128), computed as it is written (no second pass).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from lota_cli import ARTIFACT_FORMAT, LotaError

# 2: per-tensor checksums (SHA-256), and the fingerprint computed from them; 3: the checksums are XXH3-128,
# which hashes 8.7 GB/s here against SHA-256's 1.4 (a merge at 8B reads 7 GB of deltas, each checked)
FORMAT_VERSION = ARTIFACT_FORMAT
KINDS = ("task_vector", "mask", "sparse_delta")
MADE_BY = {"task_vector": "calibrate or merge", "mask": "extract", "sparse_delta": "sparse-train or lotto"}
NO_FINGERPRINT = "0" * 64


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
    fingerprint: str = NO_FINGERPRINT
    header_sha256: str = ""  # of the whole header with this field zeroed; empty in artifacts of lota < 0.1.1
    checksums: dict[str, str] = field(default_factory=dict)  # key -> tensor_digest of its data; empty in format 1
    # the base's weights as saved, fingerprinted in name order (models.model_saved_fingerprint): checkable from the
    # base's shards alone; empty where unknown
    base_checkpoint: str = ""
    # a mask's: what ranked its entries, {"name": ..., ...what makes it reproducible}; empty where not recorded
    # (other kinds, older masks)
    source: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def tensor_digest(fmt: int = FORMAT_VERSION):
    """A new hash of a tensor's bytes as artifacts of format `fmt` record it (XXH3-128 from format 3, SHA-256
    in format 2): detects a damaged copy, which is what the checksums are for, not a forger."""
    return xxhash.xxh3_128() if fmt >= 3 else hashlib.sha256()


def digest_of(array: np.ndarray, fmt: int) -> str:
    digest = tensor_digest(fmt)
    digest.update(array.view(np.uint8))
    return digest.hexdigest()


def tensors_fingerprint(checksums: dict[str, str]) -> str:
    """An artifact's fingerprint (format 2 on): SHA-256 over its keys and their data's checksums, in file order."""
    digest = hashlib.sha256()
    for key, checksum in checksums.items():
        digest.update(f"{key}:{checksum};".encode())
    return digest.hexdigest()


def parse_meta(path: Path, text) -> Meta:
    """The Meta in an artifact's header text, refusing damaged metadata in one line."""
    try:
        fields = json.loads(text)
        meta = Meta(**fields)
    except (ValueError, TypeError) as err:
        raise LotaError(f"{path}: its lota metadata is damaged ({str(err)[:120]}); re-create the artifact") from None
    if not (isinstance(meta.shapes, dict) and isinstance(meta.kind, str) and isinstance(meta.format, int)):
        raise LotaError(f"{path}: its lota metadata is damaged (wrong types); re-create the artifact")
    return meta


def check_header_sha256(path: Path, raw: bytes, meta: Meta) -> None:
    """The header is byte for byte what lota wrote (artifacts from before the checksum are let through)."""
    if not meta.header_sha256:
        return
    digest = str(meta.header_sha256).encode()
    zeroed = raw.replace(digest, NO_FINGERPRINT.encode())
    if raw.count(digest) != 1 or hashlib.sha256(zeroed).hexdigest() != meta.header_sha256:
        raise LotaError(f"{path} is corrupt: its header does not match its checksum (a damaged copy?); "
                        "re-create it or copy it again")
