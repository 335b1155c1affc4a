"""`sdcompress convert SRC -o DST`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sdcompress.choices import ConvertFormat, PredictionType
from sdcompress.choices import DType as DTypeChoice
from sdcompress.cli._options import (
    DTYPE_METAVAR,
    AllowNonfinite,
    AllowPickle,
    Device,
    DType,
    Json,
    Output,
    Overwrite,
    OverwriteForeign,
    Tokenizer,
    renamed,
)
from sdcompress.cli._output import emit_json, err, human_bytes, note, success


def convert(
    src: Annotated[str, typer.Argument(help="Single file, diffusers folder, hub id or tiny model.")],
    output: Output,
    dtype: DType = None,
    vae_dtype: Annotated[
        DTypeChoice | None,
        typer.Option(
            "--vae-dtype",
            parser=DTypeChoice.cli,
            metavar=DTYPE_METAVAR,
            help="VAE dtype (default: --dtype, but the SDXL VAE stays as it is rather than fp16).",
        ),
    ] = None,
    ema: Annotated[
        bool, typer.Option("--ema", help="Take the U-Net's EMA weights where the file has them.")
    ] = False,
    unet_only: Annotated[bool, typer.Option("--unet-only", help="Write only the U-Net.")] = False,
    format_: Annotated[
        ConvertFormat | None,
        typer.Option(
            "--format",
            help="single-file or diffusers (default: from the output path); for a LoRA file: kohya (default) "
            "or peft; for an embedding: a1111 (a .safetensors output) or diffusers (a folder).",
        ),
    ] = None,
    to: Annotated[
        ConvertFormat | None, typer.Option("--to", hidden=True, help="Deprecated name of --format.")
    ] = None,
    prediction_type: Annotated[
        PredictionType | None,
        typer.Option("--prediction-type", help="What the U-Net predicts, when the file does not say."),
    ] = None,
    tokenizer: Tokenizer = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    allow_pickle: AllowPickle = False,
    allow_nonfinite: AllowNonfinite = False,
    json_: Json = False,
) -> None:
    """Convert between single-file (A1111/ComfyUI) and diffusers folders, and between LoRA layouts.

    Embeddings convert between the A1111/ComfyUI file and diffusers' learned_embeds layout. A path ending in .safetensors gets a single file; anything else a diffusers folder.
    """
    # The services load torch: imported when the command runs, so --help and usage errors stay fast.
    from sdcompress.checkpoint.atomic import overwrite_mode
    from sdcompress.services.convert import ConvertRequest
    from sdcompress.services.convert import convert as run_convert
    from sdcompress.services.embedding_convert import convert_embedding, is_embedding
    from sdcompress.services.lora_convert import convert_lora_file, is_lora_file

    req = ConvertRequest(
        src=src,
        output=output,
        dtype=dtype,
        vae_dtype=vae_dtype,
        ema=ema,
        unet_only=unet_only,
        overwrite=overwrite_mode(overwrite, overwrite_foreign),
        tokenizer=tokenizer,
        allow_pickle=allow_pickle,
        allow_nonfinite=allow_nonfinite,
        device=device,
        prediction_type=prediction_type,
        format=renamed(format_, to, new="--format", old="--to"),
    )
    if is_embedding(src):
        emb = convert_embedding(req)
        if json_:
            from dataclasses import asdict

            emit_json(asdict(emb))
        else:
            success(
                f"embedding {emb.token} ({emb.vectors} vectors, {emb.family}) -> {emb.format}: wrote {emb.output}"
            )
        return
    if is_lora_file(src):
        lora = convert_lora_file(req)
        if json_:
            from dataclasses import asdict

            emit_json(asdict(lora))
        else:
            success(f"{lora.source_layout} -> {lora.format}: wrote {lora.output} ({lora.modules} modules)")
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed} tensors"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=json_,
    ) as progress:
        task = progress.add_task("converting", total=None)
        result = run_convert(req, on_tensor=lambda _name, _tensor: progress.advance(task))
    if json_:
        from dataclasses import asdict

        emit_json(asdict(result))
        return
    success(
        f"{result.direction}: wrote {result.output} ({result.tensors} tensors, "
        f"{human_bytes(result.bytes_written)}, {result.seconds:.1f} s)"
    )
    for n in result.notes:
        note(n)
