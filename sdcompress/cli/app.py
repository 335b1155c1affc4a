"""The `sdcompress` command: one Typer app, one error policy.

Every command module registers itself here with one line. Errors the user can
fix (`SdcError`) become one sentence on stderr and exit code 2; `--debug`
shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import Annotated, Any

import typer
import typer.main
import typer.models
from typer.core import TyperCommand, TyperGroup

from sdcompress import __version__
from sdcompress.errors import SdcError

# name -> (module, attribute, the first paragraph of its help), in the order `--help` lists them.
# The summary is here so that `sdcompress --help` imports no command module (a test keeps it in step).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": (
        "sdcompress.cli.info",
        "info",
        "Show a model's format, family or preset, dtypes, parameter counts per component and stage, and size.",
    ),
    "convert": (
        "sdcompress.cli.convert",
        "convert",
        "Convert between single-file (A1111/ComfyUI) and diffusers folders, and between LoRA layouts.",
    ),
    "prune": (
        "sdcompress.cli.prune",
        "prune",
        "Prune a teacher U-Net into a student: a published layout or your own, initialised from the teacher.",
    ),
    "distill": (
        "sdcompress.cli.distill",
        "distill",
        "Distill a pruned student U-Net from its teacher (task + output + feature losses, BK-SDM style).",
    ),
    "finetune": (
        "sdcompress.cli.finetune",
        "finetune",
        "Fine-tune a pipeline's U-Net (and optionally its text encoders) on captioned images.",
    ),
    "extract-lora": (
        "sdcompress.cli.extract",
        "extract_lora",
        "Extract a LoRA from the difference between a fine-tuned model and its base.",
    ),
    "quantize": (
        "sdcompress.cli.quantize",
        "quantize",
        "Quantize a model to fp8, scaled fp8 or GGUF files (ComfyUI, Forge, diffusers), each layer's error measured.",
    ),
    "merge": (
        "sdcompress.cli.merge",
        "merge",
        "Merge models and LoRAs, tensor by tensor. Output .safetensors: one file; else a diffusers folder.",
    ),
    "bench": (
        "sdcompress.cli.bench",
        "bench",
        "Measure U-Net parameters, size, peak memory and denoising steps/s; speedup against the first model.",
    ),
    "eval": (
        "sdcompress.cli.eval",
        "eval_models",
        "Score models against a teacher on the same prompts and seeds: agreement, CLIP score, FID, a grid.",
    ),
    "push": (
        "sdcompress.cli.push",
        "push",
        "Upload a model folder, a single file or a LoRA to the Hugging Face Hub with a model card.",
    ),
    "demo": (
        "sdcompress.cli.demo",
        "demo",
        "Run prune -> distill -> extract-lora -> convert -> LCM -> bench -> fp8 on the built-in tiny SDXL-shaped model, offline.",
    ),
    "lora": ("sdcompress.cli.lora", "app", "Train LoRA adapters."),
    "hypernetwork": ("sdcompress.cli.hypernetwork", "app", "Train A1111 hypernetworks."),
    "embedding": ("sdcompress.cli.embedding", "app", "Train textual-inversion embeddings."),
    "data": ("sdcompress.cli.data", "app", "Prepare training data: sharded latents and text embeddings."),
}
_loaded: dict[str, Any] = {}


def load_command(name: str) -> Any:
    """The click command for `name`, built from its module on first use."""
    if name not in _loaded:
        module, attribute, _ = COMMANDS[name]
        target = getattr(importlib.import_module(module), attribute)
        if isinstance(target, typer.Typer):
            command = typer.main.get_group(target)
            command.name = name
        else:
            info = typer.models.CommandInfo(name=name, callback=target)
            command = typer.main.get_command_from_info(
                info,
                pretty_exceptions_short=app.pretty_exceptions_short,
                rich_markup_mode=app.rich_markup_mode,
            )
        _loaded[name] = command
    return _loaded[name]


class LazyGroup(TyperGroup):
    """The root group: a command's module is imported only when that command runs or shows its help.

    Typer builds every command from its function when the app starts, which
    imports every command module and, through them, torch and diffusers (2-10 s).
    Listing the commands needs only their names and summaries, so `--help`,
    completion of command names and a mistyped command answer at once.
    """

    _listing = False

    def list_commands(self, _ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, _ctx: Any, name: str) -> Any:
        if name not in COMMANDS:
            return None
        if self._listing:
            summary = COMMANDS[name][2]
            return TyperCommand(name=name, help=summary, short_help=summary)
        return load_command(name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="sdcompress",
    cls=LazyGroup,
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
    del version  # handled by its eager callback
    _state["debug"] = debug or os.environ.get("SDCOMPRESS_DEBUG") == "1"
    from sdcompress.cli import _noise

    _noise.configure(_state["debug"])


def main() -> None:
    """Run the CLI; every error the user can fix is one line on stderr with exit code 2 (1 for Ctrl-D)."""
    try:
        from typer._click import exceptions as click_errors  # typer >= 0.26 vendors click: its own types
    except ImportError:  # typer < 0.26 runs on the click package
        from click import exceptions as click_errors

    try:
        code = app(standalone_mode=False)
    except SdcError as e:
        if _state["debug"]:
            raise
        _error(str(e))
        sys.exit(e.exit_code)
    except click_errors.NoArgsIsHelpError as e:  # the help is already printed
        sys.exit(e.exit_code)
    except click_errors.UsageError as e:
        # click's usage errors are a boxed usage block; the house rule is one sentence naming the fix.
        where = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
        _error(" ".join(e.format_message().split()).rstrip(".") + where + ".")
        sys.exit(e.exit_code)
    except click_errors.ClickException as e:
        _error(e.format_message())
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        # Writers check free space before sized writes and name the output (atomic.py); this catches a
        # disk that fills during an unsized write (a log, a validation grid) so it is still one sentence.
        if _state["debug"] or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        _error(f"the disk is full{where}; free some space there or choose another output path.")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _error(message: str) -> None:
    from sdcompress.cli._output import err

    err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True, markup=True)
