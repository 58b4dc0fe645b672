"""The names of a PEFT Super-Tuning adapter's files and tensors, and how to tell a path is one (torch-free)."""

from __future__ import annotations

from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's module names, as save_pretrained writes them
INDICES, VALUES = "supertuning_indices", "supertuning_values"
SOURCE_KEY, ENTRIES_KEY = "lota_source", "lota_entries"  # lota's metadata in the adapter's safetensors header


def is_adapter(path) -> bool:
    """A directory, or a file named adapter_model.safetensors: what read_adapter reads."""
    path = Path(path)
    return path.is_dir() or path.name == ADAPTER_WEIGHTS
