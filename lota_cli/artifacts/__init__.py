"""Artifacts: lota's files (task vectors, masks, sparse deltas), one safetensors file each with lota's
metadata in the header. The format and its checks (_format), the torch-free reader (StoredFile), the torch
side (Artifact) and the writers. Opening whatever path a stage was given, PEFT adapters included, is
lota_cli.inputs'."""

from lota_cli.artifacts._artifact import Artifact, StoredTensor
from lota_cli.artifacts._format import (FORMAT_VERSION, KINDS, MADE_BY, NO_FINGERPRINT, Meta, parse_meta,
                                        tensor_digest, tensors_fingerprint)
from lota_cli.artifacts._stored import StoredFile, same_layout
from lota_cli.artifacts._writers import ArtifactWriter, library_versions, save_dense, save_sparse, stage_meta

__all__ = ["FORMAT_VERSION", "KINDS", "MADE_BY", "NO_FINGERPRINT", "Artifact", "ArtifactWriter", "Meta", "StoredFile",
           "StoredTensor", "library_versions", "parse_meta", "same_layout", "save_dense", "save_sparse",
           "stage_meta", "tensor_digest", "tensors_fingerprint"]
