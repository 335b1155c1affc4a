"""Options shared by several commands, declared once so they mean the same thing everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

Output = Annotated[str, typer.Option("--output", "-o", help="Where to write the result.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
AllowPickle = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow pickled .ckpt/.bin inputs (read with weights_only=True)."),
]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
DType = Annotated[
    str | None, typer.Option("--dtype", help="fp32, fp16 or bf16 (default: keep the source dtype).")
]
Tokenizer = Annotated[
    str | None, typer.Option("--tokenizer", help="Folder with tokenizer/ (and tokenizer_2/) to use.")
]
