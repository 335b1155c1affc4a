"""Write docs/reference/cli.md from the Typer app itself, so the reference cannot drift from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> None:
    out = Path(__file__).parent / "reference" / "cli.md"
    out.parent.mkdir(exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "typer",
            "sdcompress.cli.app",
            "utils",
            "docs",
            "--name",
            "sdcompress",
            "--title",
            "Command reference",
            "--output",
            str(out),
        ],
        check=True,
    )


if __name__ == "__main__":
    main()
