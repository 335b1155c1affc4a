"""`sdcompress data prepare SOURCE --model REF -o OUT`: shards of latents and text embeddings for training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from sdcompress.choices import DType
from sdcompress.cli._options import (
    DTYPE_METAVAR,
    AllowPickle,
    Device,
    Json,
    Output,
    Overwrite,
    OverwriteForeign,
)

app = typer.Typer(help="Prepare training data: sharded latents and text embeddings.", no_args_is_help=True)


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator:
    """Samples done of the total, samples/s and time left, on stderr."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from sdcompress.cli._output import err

    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("[bold]preparing[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[note]}[/dim]"),
        console=err,
        transient=True,
    )
    task = bar.add_task("prepare", total=None, rate="", note="")

    def update(event) -> None:
        speed = bar.tasks[0].speed
        note = f"{event.skipped} skipped" if event.skipped else ""
        if event.kept_shards:
            note += f"{', ' if note else ''}{event.kept_shards} shard(s) kept"
        rate = f"{speed:.1f} samples/s" if speed else ""
        bar.update(task, completed=event.done, total=event.total, rate=rate, note=note)

    with bar:
        yield update


@app.command("prepare")
def prepare(
    source: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of images with .txt captions or metadata.jsonl (or give --dataset-name)."
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model", help="Model whose VAE and text encoders encode the data (the teacher). Required."
        ),
    ] = ...,  # type: ignore[assignment]
    output: Output = ...,  # type: ignore[assignment]
    dataset_name: Annotated[
        str | None, typer.Option("--dataset-name", help="Hugging Face dataset id (needs `datasets`).")
    ] = None,
    dataset_split: Annotated[str, typer.Option("--dataset-split", help="Split of --dataset-name.")] = "train",
    image_column: Annotated[
        str, typer.Option("--image-column", help="Image column of --dataset-name.")
    ] = "image",
    caption_column: Annotated[
        str, typer.Option("--caption-column", help="Caption column (dataset or metadata.jsonl).")
    ] = "text",
    caption_extension: Annotated[
        str, typer.Option("--caption-extension", help="Sidecar caption suffix.")
    ] = ".txt",
    require_captions: Annotated[
        bool, typer.Option("--require-captions", help="Refuse images without a caption.")
    ] = False,
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="Training resolution (default: the model's).")
    ] = None,
    buckets: Annotated[
        bool, typer.Option("--buckets", help="Aspect-ratio buckets instead of squares.")
    ] = False,
    dtype: Annotated[
        DType,
        typer.Option(
            "--dtype",
            parser=DType.cli,
            metavar=DTYPE_METAVAR,
            help="Storage dtype of latents and embeddings (fp32 trains bit-identical to the images).",
        ),
    ] = DType.FP16,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images encoded at once.")] = 8,
    num_workers: Annotated[int, typer.Option("--num-workers", help="Image loading worker processes.")] = 0,
    device: Device = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted prepare (finished shards are kept).")
    ] = False,
    json_: Json = False,
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Encode captioned images once into WebDataset shards that `--data` trains from."""
    from sdcompress.checkpoint.atomic import overwrite_mode
    from sdcompress.cli._output import emit_json, note, out, success
    from sdcompress.services.data_prepare import DataPrepareRequest, data_prepare
    from sdcompress.training.config import DataConfig

    data = DataConfig(
        data_dir=source,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        image_column=image_column,
        caption_column=caption_column,
        caption_extension=caption_extension,
        resolution=resolution,
        buckets=buckets,
        require_captions=require_captions,
    )
    request = DataPrepareRequest(
        model=model,
        output=Path(output),
        data=data,
        dtype=str(dtype),
        shard_size=shard_size,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        resume=resume,
        overwrite=overwrite_mode(overwrite, overwrite_foreign),
        allow_pickle=allow_pickle,
    )
    with _progress_bar(not json_) as progress:
        result = data_prepare(request, progress)
    if json_:
        import dataclasses

        emit_json(dataclasses.asdict(result))
    if result.interrupted:
        note(f"interrupted; finished shards are kept in {result.work_dir}: rerun with --resume to continue")
        raise typer.Exit(130)
    if json_:
        return
    if result.skipped:
        examples = ", ".join(result.skipped_examples)
        note(f"skipped {result.skipped} unreadable image(s), e.g. {examples}")
    if result.missing_captions:
        note(f"{result.missing_captions} image(s) had no caption and were encoded with the empty caption")
    out.print(
        f"{result.samples} samples in {result.shards} shards ({result.family}, {result.resolution} px, "
        f"{result.buckets} bucket(s)), {result.samples_per_s:.1f} samples/s"
    )
    success(f"wrote {result.output}")
