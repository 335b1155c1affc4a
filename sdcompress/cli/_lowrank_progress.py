"""A rich progress bar fed by a service's (name, done, total) callback, on stderr."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sdcompress.cli._output import err


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    if not enabled:
        yield lambda *_: None
        return
    bar = Progress(
        TextColumn(f"[bold]{label}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[item]}[/dim]"),
        console=err,
        transient=True,
    )
    task = bar.add_task(label, total=None, item="")

    def update(name: str, done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, item=name[-60:])

    with bar:
        yield update
