"""Failures as one line: whatever goes wrong composing a config or running a stage ends as `lota <stage>: ...`
on stderr and exit status 1 (`debug=true` shows the traceback)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from lota_cli import LotaError

HYDRA_NOISE = ("full_key:", "reference_type=", "object_type=", "Config search path", "provider=",
               "Set the environment")


class Debug:
    """Whether failures show their traceback: `debug=` on the command line (any spelling Hydra reads as true),
    or the composed config's `debug` once there is one."""

    value = False


def debug_requested(args: list[str]) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.nodes import BooleanNode

    wanted = [a for a in args if a.lstrip("+").startswith("debug=")]
    try:
        overrides = OverridesParser.create().parse_overrides(wanted)
        return any(bool(BooleanNode(o.value())._value()) for o in overrides)
    except Exception:  # a malformed debug= is reported by the composition itself
        return False


@contextlib.contextmanager
def reported(stage: str):
    """Run a stage's work; any failure becomes one line `lota <stage>: ...` on stderr and exit status 1."""
    try:
        yield
    except BrokenPipeError:  # the reader of stdout went away (`lota merge --help | head`): leave quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except Exception as err:
        if Debug.value:
            raise
        logging.getLogger(f"lota.{stage}").debug("error", exc_info=True)
        print(f"lota {stage}: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def one_line(err: Exception) -> str:
    """What went wrong, in one line a user can act on."""
    if isinstance(err, LotaError):
        return f"error: {err}"
    if isinstance(err, OSError):
        return f"error: {err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    lines = [line.strip() for e in (err, err.__cause__) if e is not None for line in str(e).splitlines()]
    text = "; ".join(dict.fromkeys(line for line in lines if line and not line.startswith(HYDRA_NOISE)))
    if isinstance(err, (HydraException, OmegaConfBaseException)):  # composition: a bad key, value or override
        return f"error: {text}"
    return f"{type(err).__name__}: {text} (rerun with debug=true for the traceback)"
