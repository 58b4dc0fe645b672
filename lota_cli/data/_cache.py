"""The cache of encoded data sets, between runs: one .npz per (tokenizer, task settings, rows), kept at most
LOTA_CACHE_MAX_GB (default 20) in all, the least recently used pruned first when a new one is written.

It lives in cache_root()/data ($LOTA_CACHE/data, else ~/.cache/lota/data). Deleting that directory clears
it (nothing else is kept there); task.cache=false neither reads nor writes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lota_cli import LotaError, cache_root

log = logging.getLogger(__package__)
_CACHE_VERSION = 1  # bump when encoding changes what it produces
DEFAULT_MAX_GB = 20.0


def cache_dir() -> Path:
    """Where encoded data sets are kept between runs (lota_cli.cache_root()/data)."""
    return cache_root() / "data"


def max_bytes() -> int:
    """The cache's cap: $LOTA_CACHE_MAX_GB (decimal gigabytes; 0 keeps nothing but the newest entry)."""
    text = os.environ.get("LOTA_CACHE_MAX_GB", "").strip()
    try:
        gigabytes = float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:  # also NaN
        raise LotaError(f"LOTA_CACHE_MAX_GB={text!r} is not a size in GB; give a number >= 0, e.g. 20")
    return int(gigabytes * 1e9)


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256(text.encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.all_special_ids,
                              getattr(tokenizer, "chat_template", None)]).encode())
    return digest.hexdigest()


def cache_path(tokenizer, task, purpose: str, rows) -> Path:
    """The entry of an encoding, keyed by what it depends on: the tokenizer, the task's settings and the rows
    (datasets' fingerprint, which follows the files' contents and the shuffle/select applied)."""
    settings = {k: v for k, v in asdict(task).items() if k not in ("name", "metric", "answer_pattern", "packing",
                                                                    "streaming", "num_proc", "cache")}
    payload = json.dumps([_CACHE_VERSION, _tokenizer_key(tokenizer), settings, purpose, rows._fingerprint],
                         sort_keys=True, default=str)
    return cache_dir() / f"{hashlib.sha256(payload.encode()).hexdigest()[:32]}.npz"


def load(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cached entry (its use recorded, for pruning), or None where there is none."""
    try:
        with np.load(path) as arrays:
            loaded = {key: arrays[key] for key in arrays.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as err:  # a damaged entry (a full disk, say): encoded afresh
        log.warning("the cached encoding %s is unreadable (%s); encoding the data again", path, err)
        path.unlink(missing_ok=True)
        return None
    os.utime(path)  # the least recently used go first
    return loaded


def store(path: Path, **arrays: np.ndarray) -> None:
    """Write an entry atomically, then prune the cache to its cap, oldest use first (never this entry). A
    cache that cannot be written is skipped with a warning: it only saves time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial.npz")
        try:
            np.savez(partial, **arrays)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not cache the encoded data in %s (%s); the next run encodes it again",
                    path.parent, err.strerror or err)
        return
    prune(max_bytes(), keep=path)


def prune(limit: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used entries until the cache holds at most `limit` bytes (`keep` stays);
    returns what was deleted."""
    entries = []
    for entry in cache_dir().glob("*.npz"):
        try:
            stat = entry.stat()
        except FileNotFoundError:  # pruned by another run meanwhile
            continue
        entries.append((stat.st_mtime, stat.st_size, entry))
    total, removed = sum(size for _, size, _ in entries), []
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if entry == keep or entry.name.endswith(".partial.npz"):
            continue
        entry.unlink(missing_ok=True)
        total -= size
        removed.append(entry)
    if removed:
        log.info("pruned %d cached encodings (LOTA_CACHE_MAX_GB=%g): %s", len(removed), limit / 1e9,
                 ", ".join(p.name for p in removed))
    return removed
