"""Opening whatever path a stage was given: the one place that knows every format lota reads (its artifact
files, and PEFT Super-Tuning adapters, converted on read into sparse deltas)."""

from __future__ import annotations

from pathlib import Path

from lota_cli import interop
from lota_cli.artifacts import KINDS, Artifact, StoredFile


def open_artifact(path: str | Path, kinds: tuple[str, ...] = KINDS) -> Artifact:
    """An artifact file, or a PEFT sparse adapter (its directory or its adapter_model.safetensors) as the
    sparse delta it holds, with the torch side of either (artifacts.Artifact)."""
    if interop.is_adapter(path):
        return interop.read_adapter(Path(path), kinds)
    return Artifact(path, kinds)


def open_stored(path: str | Path, kinds: tuple[str, ...] = KINDS) -> StoredFile:
    """What the inspecting stages read: an artifact file without torch; a PEFT adapter, converted on read (which
    needs torch)."""
    if interop.is_adapter(path):
        return open_artifact(path, kinds)
    return StoredFile(path, kinds)
