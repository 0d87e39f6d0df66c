"""Progress bars for long loops, drawn on stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, emoji=False)


@contextmanager
def progress_bar(description: str, total: int | None, shown: bool = True,
                 logged: bool = False) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1, status=None)`; the bar disappears when done (a table usually follows). Drawn only on a
    terminal (or a notebook): in a log file a bar is no help, and would leave a blank line where it stood; there,
    with `logged`, each advance that has a status is a line of its own (a few long steps, as an evolve run's
    rounds: a job's log shows each as it ends). Only where `shown` (one process of several draws it)."""
    if not (shown and (console.is_terminal or console.is_jupyter)):
        done = [0]

        def log_line(n: int = 1, status: str | None = None) -> None:
            done[0] += n
            if shown and logged and status is not None:
                console.print(f"{description} {done[0]}/{total}: {status}", markup=False, highlight=False,
                              soft_wrap=True)
        yield log_line
        return
    columns = [
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with _BarAndStatus(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            progress.update(task, advance=n, **({"status": status} if status is not None else {}))

        yield advance


class _BarAndStatus(Progress):
    """The bar, and under it its last status, cut to the terminal's width: a status as long as an evolve round's
    (score, calls, operations) beside the bar would push the bar and its times off a terminal's line."""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            if task.fields.get("status"):
                yield Text(task.fields["status"], no_wrap=True, overflow="ellipsis")
