"""Options shared by several commands, declared once so they mean the same thing everywhere."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sdcompress import choices
from sdcompress.errors import SdcError

Output = Annotated[str, typer.Option("--output", "-o", help="Where to write the result.")]


# A command passes both flags to `atomic.overwrite_mode`, which turns them into the one policy
# (`atomic.Overwrite`) that the writers take.
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing output that sdcompress wrote (a folder holding other files is refused).",
    ),
]
OverwriteForeign = Annotated[
    bool,
    typer.Option(
        "--overwrite-foreign",
        help="Replace an existing output folder even if it holds files sdcompress did not write "
        "(they are deleted; implies --overwrite).",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
AllowPickle = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow pickled .ckpt/.bin inputs (read with weights_only=True)."),
]
AllowNonfinite = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite", help="Write NaN/inf values (e.g. an fp16 overflow) instead of refusing them."
    ),
]
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N."
Device = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
DTYPE_METAVAR = "<fp32|fp16|bf16>"
DType = Annotated[
    choices.DType | None,
    typer.Option(
        "--dtype",
        parser=choices.DType.cli,
        metavar=DTYPE_METAVAR,
        help="fp32, fp16 or bf16 (or float32, float16, bfloat16; default: keep the source dtype).",
    ),
]
Tokenizer = Annotated[
    str | None, typer.Option("--tokenizer", help="Folder with tokenizer/ (and tokenizer_2/) to use.")
]


def renamed(new_value: Any, old_value: Any, *, new: str, old: str, default: Any = None) -> Any:
    """The value of an option renamed for consistency: the new flag's, else the old (hidden) flag's.

    The old name stays for one release (CHANGELOG.md lists it) and says so on stderr when used.
    """
    if old_value is None:
        return new_value
    if new_value != default:
        raise SdcError(f"{old} is the old name of {new}; give only {new}.")
    from sdcompress.cli._output import note

    note(f"{old} is deprecated and will be removed in the next release; use {new}.")
    return old_value
