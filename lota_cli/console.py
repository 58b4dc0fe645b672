"""Output on stderr: the console the stages print tables to, and the training progress bar (rich on a
terminal, nothing otherwise: the loop logs its numbers every train.log_every steps either way). stdout stays
for the paths a stage wrote.

A process lota launched (dist=...) writes its stderr into its launcher's pipe, which the launcher passes on
as it comes. When the launcher's own stderr is a terminal, it says so to the processes (LOTA_TERMINAL=1, and
the terminal's width in COLUMNS), and the main one draws its bar into the pipe as it would on the terminal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

TERMINAL = "LOTA_TERMINAL"  # set by a launcher whose stderr is a terminal


def is_terminal() -> bool:
    """Whether stderr ends on a terminal: its own, or its launcher's (through a pipe)."""
    return sys.stderr.isatty() or os.environ.get(TERMINAL) == "1"


def terminal_env() -> dict[str, str]:
    """What a launcher passes to its processes so that they draw on its terminal ({} when it has none)."""
    if not sys.stderr.isatty():
        return {}
    return {TERMINAL: "1", "COLUMNS": os.environ.get("COLUMNS") or str(shutil.get_terminal_size().columns)}


stderr = Console(stderr=True, force_terminal=True if os.environ.get(TERMINAL) == "1" else None)


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def advance(self, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, **fields)


@contextlib.contextmanager
def progress_bar(total: int, completed: int = 0, enabled: bool = True, description: str = "train"):
    """A bar showing step, loss, tokens/s and ETA; silent when disabled or stderr is not a terminal."""
    if not enabled or not is_terminal():
        yield _Bar(None, None)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tok_s]:.0f} tok/s"),
               TimeRemainingColumn()]
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, loss=float("nan"), tok_s=0.0)
        yield _Bar(progress, task)
