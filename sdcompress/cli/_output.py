"""The one output sink of the CLI.

Commands hand it data (a title, rows, a summary dict); it renders a rich table
for people, or JSON with `--json`. Progress and notes go to stderr, so stdout
stays clean for `--json` consumers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Sequence[str] = ()
) -> None:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    out.print(t)


def note(text: str) -> None:
    err.print(f"[dim]{text}[/dim]")


def success(text: str) -> None:
    out.print(f"[green]✓[/green] {text}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: int) -> str:
    return f"{n:,}"
