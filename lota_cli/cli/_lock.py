"""One run at a time in an output directory: the process that speaks for a run holds out/.lota.lock (an
flock, so a killed run leaves no stale lock) while its stage runs. An out= given on the command line is
locked before Hydra writes anything there; every job's own out (the default, which holds the start time, or
an interpolated one) once it is composed."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from lota_cli import LotaError
from lota_cli.io import write_error

LOCK_FILE = ".lota.lock"
_HELD: set[Path] = set()  # the directories this process holds the lock of


def holds_lock() -> bool:
    """Only the process that speaks for a run takes its lock: not the processes lota launched (their
    launcher holds it), not the other ranks or machines of a user's launcher."""
    return (os.environ.get("LOTA_LAUNCHED") != "1" and os.environ.get("RANK", "0") == "0"
            and os.environ.get("MACHINE_RANK", "0") == "0")


def locked_out(args: list[str]) -> Path | None:
    """The output directory to lock before composing: an `out=` given on the command line, when the stage will
    run (not for --cfg, --info, --help). A sweep locks its root, the jobs' parent. (The default out and an
    interpolated out= are locked by the job, once composed.)"""
    if any(a in ("--cfg", "-c", "--info", "-i", "--hydra-help") or a.startswith("--cfg=") for a in args):
        return None
    values = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("out=")]
    if not values or "${" in values[-1]:
        return None
    return Path(values[-1].strip("'\"")).resolve()


@contextlib.contextmanager
def exclusive(out: Path | None, stage: str):
    """Hold out/.lota.lock while the stage runs, so a second command given the same out= refuses at once
    instead of overwriting the first one's checkpoints (a directory this process holds already: nothing)."""
    import fcntl

    if out is None or not holds_lock() or out in _HELD:
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_FILE, "a+")
    except OSError as err:
        raise write_error(out / LOCK_FILE, err) from err
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LotaError(f"out={out} is in use by {holder}; wait for it to finish or choose another out=") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"`lota {stage}` (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
    except OSError as err:
        with contextlib.suppress(OSError):  # its buffer cannot be written either
            handle.close()
        raise write_error(out / LOCK_FILE, err) from err
    _HELD.add(out)
    try:
        yield
    finally:
        _HELD.discard(out)
        handle.close()  # releases the lock
