"""Other tools' formats: LoTA sparse deltas as PEFT Super-Tuning adapters (written by `lota export`), and
such adapters read back as sparse deltas wherever a stage takes one.

read_adapter and write_adapters are imported on first use (they need torch and a model's config), so that
telling an adapter's path from an artifact's (is_adapter) costs the torch-free stages nothing.
"""

from lota_cli.interop._names import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ENTRIES_KEY, INDICES, PREFIX, SOURCE_KEY, VALUES,
                                     is_adapter)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ENTRIES_KEY", "INDICES", "PREFIX", "SOURCE_KEY", "VALUES", "is_adapter",
           "read_adapter", "write_adapters"]


def __getattr__(name: str):
    if name in ("read_adapter", "write_adapters"):
        from lota_cli.interop import _peft

        return getattr(_peft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
