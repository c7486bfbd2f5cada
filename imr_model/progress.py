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
    def __init__(self, progress: Progress, task_id: int, unit: str):
        self._progress = progress
        self._task = task_id
        self.unit = unit

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)
        speed = next(t.speed for t in self._progress.tasks if t.id == self._task)
        if speed:
            self._progress.update(self._task, rate=f"{speed:.1f} {self.unit}/s")

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
        yield _Bar(progress, task_id, unit)
