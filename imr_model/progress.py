"""One progress-bar style for every long-running command (Rich, on stderr, quiet when not a terminal)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress, task_id: int):
        self._progress = progress
        self._task = task_id

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def update(self, **fields) -> None:
        self._progress.update(self._task, **fields)


@contextmanager
def progress_bar(description: str, *, total: float | None, unit: str = "it", disable: bool = False) -> Iterator[_Bar]:
    """Yield a bar with `.advance(n)`; shows rate in `unit`/s and ETA. Renders on stderr only."""
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable or not console.is_terminal,
        transient=False,
    )
    with progress:
        task_id = progress.add_task(description, total=total, rate="")
        bar = _Bar(progress, task_id)
        yield bar
        task = progress.tasks[0]
        if task.speed:
            progress.update(task_id, rate=f"{task.speed:.1f} {unit}/s")
