"""The `sdcompress` command: one Typer app, one error policy.

Every command module registers itself here with one line. Errors the user can
fix (`SdcError`) become one sentence on stderr and exit code 2; `--debug`
shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from sdcompress import __version__
from sdcompress.errors import SdcError

app = typer.Typer(
    name="sdcompress",
    help="Compress and adapt Stable Diffusion checkpoints: prune, distill, fine-tune, LoRA, merge, convert, push.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"sdcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("SDCOMPRESS_DEBUG") == "1"
    from sdcompress.cli import _noise

    _noise.configure(_state["debug"])


def _register() -> None:
    """One line per command, in the order of the workflow (this is the order `--help` lists them)."""
    from sdcompress.cli import (
        bench,
        convert,
        demo,
        distill,
        extract,
        finetune,
        info,
        lora,
        merge,
        prune,
        push,
    )

    app.command("info")(info.info)
    app.command("convert")(convert.convert)
    app.command("prune")(prune.prune)
    app.command("distill")(distill.distill)
    app.command("finetune")(finetune.finetune)
    app.add_typer(lora.app, name="lora")
    app.command("extract-lora")(extract.extract_lora)
    app.command("merge")(merge.merge)
    app.command("bench")(bench.bench)
    app.command("push")(push.push)
    app.command("demo")(demo.demo)


_register()


def main() -> None:
    try:
        app()
    except SdcError as e:
        if _state["debug"]:
            raise
        from sdcompress.cli._output import err

        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
