"""Progress bars for long loops, drawn on stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, emoji=False)


@contextmanager
def progress_bar(description: str, total: int | None, shown: bool = True) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1, **fields)`; the bar disappears when done (a table usually follows). Drawn only on a
    terminal (or a notebook): in a log file a bar is no help, and would leave a blank line where it stood; and
    only where `shown` (one process of several draws it)."""
    if not (shown and (console.is_terminal or console.is_jupyter)):
        yield lambda n=1, status=None: None
        return
    columns = [
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}", markup=False),
    ]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            progress.update(task, advance=n, **({"status": status} if status is not None else {}))

        yield advance
