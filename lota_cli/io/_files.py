"""Small files a stage writes (JSON results, logs of steps), and the one message for a write that failed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lota_cli import LotaError, first_line


def write_error(path: Path, err: Exception) -> LotaError:
    """The one line for a file that could not be written (a full disk, a read-only directory): it names the
    file, since the system's own error (ENOSPC from a write) does not."""
    path = Path(path)
    return LotaError(f"could not write {path}: {getattr(err, 'strerror', None) or first_line(err)}; make sure "
                     f"{path.parent} is a writable directory with free space (or choose another out=)")


def write_text(path: Path, text: str) -> Path:
    """Write a text file whole or not at all (a temporary beside it, renamed into place), its directory made
    if need be; a failure is one line naming the file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def append_line(path: Path, line: str) -> None:
    """Append one line to a text file (a run's metrics.jsonl); a failure is one line naming the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as err:
        raise write_error(path, err) from err
