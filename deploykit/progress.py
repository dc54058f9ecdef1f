"""Progress bars for stages, epochs and batches; a silent variant for tests and non-zero DDP ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Task:
    """One bar; `advance` moves it, `update` shows extra fields such as loss or accuracy."""

    def __init__(self, progress: Progress | None, task_id: Any = None) -> None:
        self._progress, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._id, n)

    def update(self, **fields: Any) -> None:
        if self._progress is not None:
            info = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            self._progress.update(self._id, info=info)


class Reporter:
    """Owns one rich Progress display; `task()` adds a bar for the duration of a block."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            if enabled
            else None
        )

    def __enter__(self) -> Reporter:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Task]:
        if self._progress is None:
            yield Task(None)
            return
        task_id = self._progress.add_task(description, total=total, info="")
        try:
            yield Task(self._progress, task_id)
        finally:
            self._progress.remove_task(task_id)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            self.console.print(message)


def silent() -> Reporter:
    return Reporter(enabled=False)
