"""The machinery of config keys: `opt(default, help)` (the meaning `lota <stage> --help` lists) and the checks
the schemas' __post_init__ run (one line naming the key and what is allowed)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from lota_cli import LotaError


def opt(default: Any = None, help: str = "", *, factory: Any = None, read: bool = True):
    """A config key with its default and its one-line meaning (`lota <stage> --help` lists the keys a stage
    reads; read=False: accepted, not read, not listed)."""
    metadata = {"help": help, "unread": not read}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise LotaError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, allowed))}")


def positive(key: str, value: Any) -> None:
    if value is not None and value <= 0:
        raise LotaError(f"{key}={value} must be > 0")


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, 1000 -> 1000: as transformers' max_shard_size reads it."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    value = str(text).strip().upper()
    if value.isdigit():
        return int(value)
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            try:
                return int(float(number) * factor)
            except ValueError:
                break
    raise LotaError(f"shard_size={text!r} is not a size; write it like 5GB, 500MB or 2GiB")


def sparsity_fraction(key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise LotaError(f"{key}={value} must be strictly between 0 and 1 (0.9 keeps the largest 10% of entries)")
