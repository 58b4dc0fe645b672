"""`lota <stage> [hydra overrides...]`: compose a stage's config with Hydra from the package's conf/ and run it.

stdout carries only the paths a stage wrote, one per line (with several processes, the main one's); logs and
progress go to stderr. Any failure is one line on stderr and exit status 1 (`debug=true` shows the
traceback), whether it happened composing the config or running the stage. A training stage asked to run on
several processes (dist=...) re-launches itself through `accelerate launch`.
"""

from __future__ import annotations

import sys

from lota_cli import ARTIFACT_FORMAT, __version__
from lota_cli.cli._errors import Debug, reported
from lota_cli.cli._lock import LOCK_FILE
from lota_cli.cli._run import run_stage
from lota_cli.cli._stages import STAGES, usage

__all__ = ["LOCK_FILE", "STAGES", "main", "return_freed_memory", "run_stage", "usage"]


def return_freed_memory() -> None:
    """Make glibc give large freed blocks (>= 1 MiB) back to the OS at once. Its default threshold grows to
    32 MiB after the first large free, after which weight-sized temporaries (a sparse layer's merged weight,
    a dense gradient) freed during a step stay in the heap: one LoTA step of a 226M-weight Llama peaked at
    3,076 MiB with the default and 2,300 with this. No-op where the C library has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    return_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        print(f"lota {__version__} (artifact format {ARTIFACT_FORMAT})")
        return
    stage, args = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"lota: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    if stage == "info":
        from lota_cli.stages.info import main as info_main

        Debug.value = "--debug" in args
        with reported(stage):
            raise SystemExit(info_main(args))
    run_stage(stage, args)
