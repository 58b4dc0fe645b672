"""Run `lota` stages from a script the way a user's shell pipeline would: stdout gives the written paths."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lota(*args: str) -> list[str]:
    """Run one stage (printed to stderr as a command line first); returns the paths it printed."""
    print(f"\n$ lota {shlex.join(args)}", file=sys.stderr, flush=True)
    t0 = time.time()
    result = subprocess.run([sys.executable, "-m", "lota_cli", *args], stdout=subprocess.PIPE, env=ENV, text=True)
    if result.returncode != 0:
        sys.exit(f"`lota {args[0]}` failed (exit {result.returncode}); see the messages above")
    print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return result.stdout.splitlines()
