"""Shared CLI pieces: console, progress bars, offline defaults."""

from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
out = Console()


def offline_if_local(model: str) -> None:
    """A Hub lookup here hangs instead of failing fast; short names and local paths never need the Hub."""
    if "/" not in model or os.path.exists(os.path.expanduser(model)):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextmanager
def progress_bar(description: str, total: int):
    """Yields an `update(done, total)` callback that drives a rich progress bar on stderr."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task_id = bar.add_task(description, total=total)

        def update(done: int, total_: int) -> None:
            bar.update(task_id, completed=done, total=total_)

        yield update
