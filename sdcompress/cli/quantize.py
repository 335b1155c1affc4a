"""`sdcompress quantize MODEL -o OUT --format F`."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sdcompress.choices import QuantFormat
from sdcompress.cli._options import AllowPickle, Json, Output, Overwrite, OverwriteForeign
from sdcompress.cli._output import emit_json, err, human_bytes, note, success, table


def quantize(
    model: Annotated[str, typer.Argument(help="Single file, diffusers folder, hub id or tiny model.")],
    output: Output,
    format_: Annotated[
        QuantFormat,
        typer.Option(
            "--format",
            "-f",
            help="fp8, fp8-e5m2, fp8-scaled (.safetensors); gguf-q8_0 ... gguf-f16 (.gguf, U-Net only); "
            "nf4, int8 (diffusers folder).",
        ),
    ],
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep",
            help="Also keep tensors matching this pattern at the source precision (glob on the original "
            "name, e.g. 'output_blocks.*.proj_out*'; a plain word matches inside names). Repeatable.",
        ),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            help="Output size to aim for (e.g. 1.4GB): the most sensitive layers stay at the source "
            "precision while the file still fits.",
        ),
    ] = None,
    max_error: Annotated[
        float | None,
        typer.Option(
            "--max-error",
            help="U-Net output relative error to stay under: the most sensitive layers are kept until the "
            "estimate meets it.",
        ),
    ] = None,
    fast: Annotated[
        bool,
        typer.Option(
            "--fast", help="With --budget/--max-error: score layers by weight error, not output error."
        ),
    ] = False,
    text_encoders: Annotated[
        bool, typer.Option("--text-encoders", help="Quantize the text encoders too (fp8 formats, nf4, int8).")
    ] = False,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora", help="LoRA file[:WEIGHT] baked in at the source precision first (repeatable)."
        ),
    ] = None,
    report: Annotated[
        bool,
        typer.Option(
            "--report/--no-report",
            help="Measure the U-Net output's error against the source (loads the U-Net in fp32).",
        ),
    ] = True,
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    allow_pickle: AllowPickle = False,
    json_: Json = False,
) -> None:
    """Quantize a model to fp8, scaled fp8 or GGUF files (ComfyUI, Forge, diffusers), each layer's error measured."""
    # The service loads torch: imported when the command runs, so --help and usage errors stay fast.
    from sdcompress.checkpoint.atomic import overwrite_mode
    from sdcompress.services.merge import LoraRef
    from sdcompress.services.quantize import QuantizeRequest
    from sdcompress.services.quantize import quantize as run_quantize

    req = QuantizeRequest(
        model=model,
        output=output,
        format=format_,
        keep=list(keep or []),
        budget=budget,
        max_error=max_error,
        fast=fast,
        text_encoders=text_encoders,
        loras=[LoraRef.parse(x) for x in lora or []],
        report=report,
        overwrite=overwrite_mode(overwrite, overwrite_foreign),
        allow_pickle=allow_pickle,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=json_,
    ) as bar:
        task = bar.add_task("writing", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        result = run_quantize(req, progress=progress, on_tensor=lambda _n, _t: bar.advance(task))
    if json_:
        emit_json(result.to_dict())
        return
    size = human_bytes(result.bytes_written)
    source = f" (source {human_bytes(result.source_bytes)})" if result.source_bytes else ""
    frac = (
        ""
        if math.isnan(result.quantized_fraction)
        else f", {result.quantized_fraction:.0%} of the U-Net's weights quantized"
    )
    success(f"{result.format}: wrote {result.output}, {size}{source}{frac}, {result.seconds:.1f} s")
    if result.output_error is not None:
        e = result.output_error
        table(
            "U-Net output against the source (fixed prompts, seeds, timesteps)",
            ["relative error", "cosine"],
            [(f"{e.relative:.3e}", f"{e.cosine:.6f}")],
            right=["relative error", "cosine"],
        )
    scored = [x for x in result.layers if x.snr_db is not None]
    if scored:
        worst = sorted(scored, key=lambda x: x.snr_db)[:8]
        table(
            "Lowest weight SNR",
            ["tensor", "SNR dB"],
            [(x.name, f"{x.snr_db:.1f}") for x in worst],
            right=["SNR dB"],
        )
    for n in result.notes:
        note(n)
