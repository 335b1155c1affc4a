"""`sdcompress info MODEL`."""

from __future__ import annotations

from typing import Annotated

import typer

from sdcompress.cli._options import AllowPickle, Json, renamed
from sdcompress.cli._output import emit_json, human_bytes, human_count, note, out, table


def info(
    model: Annotated[
        str,
        typer.Argument(
            help="Folder, .safetensors file, hub id, tiny-sd/tiny-sdxl, or with --arch a family or preset name."
        ),
    ],
    arch: Annotated[
        bool,
        typer.Option(
            "--arch",
            help="Treat MODEL as a family (sd1, sd2, sdxl, ...) or preset (ssd-1b, bk-tiny, ...) built on the meta device.",
        ),
    ] = False,
    family: Annotated[
        str | None,
        typer.Option("--family", help="With --arch and a preset: the family it is applied to (e.g. sd2)."),
    ] = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", hidden=True, help="Deprecated name of --family.")
    ] = None,
    json_: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Show a model's format, family or preset, dtypes, parameter counts per component and stage, and size."""
    # The service loads torch: imported when the command runs, so --help and usage errors stay fast.
    from sdcompress.services.info import info as run_info

    family = renamed(family, teacher, new="--family", old="--teacher")
    result = run_info(model, arch=arch, family=family, allow_pickle=allow_pickle)
    if json_:
        emit_json(result.to_dict())
        return
    out.print(
        f"[bold]{result.ref}[/bold]: {result.family_title}"
        + (f", preset [cyan]{result.preset}[/cyan]" if result.preset else "")
    )
    out.print(
        f"format {result.format}, prediction {result.prediction_type}, {result.transformer_blocks} transformer blocks"
        + (f", {human_bytes(result.size_on_disk)} on disk" if result.size_on_disk is not None else "")
    )
    if result.quantization:
        q = result.quantization
        out.print(
            f"quantized: {q['format']}, {q['bits']:g} bits, {q['quantized_fraction']:.0%} of the U-Net's weights"
        )
    table(
        "Components",
        ["component", "parameters", "dtype"],
        [(c, human_count(n), result.dtypes.get(c, "")) for c, n in result.parameters.items()],
        right=["parameters"],
    )
    table(
        "U-Net stages",
        ["stage", "parameters"],
        [(s, human_count(n)) for s, n in result.unet_stages.items()],
        right=["parameters"],
    )
    for n in result.notes:
        note(n)
