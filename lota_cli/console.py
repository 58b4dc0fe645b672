"""Progress on stderr (rich bars on a terminal, periodic log lines otherwise): stdout stays for paths."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

stderr = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def advance(self, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, **fields)


@contextlib.contextmanager
def progress_bar(total: int, completed: int = 0, enabled: bool = True, description: str = "train"):
    """A bar showing step, loss, tokens/s and ETA; silent when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tok_s]:.0f} tok/s"),
               TimeRemainingColumn()]
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, loss=float("nan"), tok_s=0.0)
        yield _Bar(progress, task)
