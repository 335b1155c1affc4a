"""`sdcompress data prepare SOURCE --model REF -o OUT`: shards of latents and text embeddings for training.

The options come from the dataclass fields they fill, through the training commands' generator
(`cli/_training_options.py`): the data options from `DataConfig` (SOURCE is its `--data`), the output
and `--num-workers` from `TrainConfig`, and the few that only preparing has from `DataPrepareOptions`.
So `--config run.toml` works here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import typer

from sdcompress.choices import DType
from sdcompress.cli import _training_options as T
from sdcompress.cli._options import DEVICE_HELP, DTYPE_METAVAR
from sdcompress.training import config as C

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


PREPARE = "Encoding"


@dataclass(frozen=True)
class DataPrepareOptions:
    """What only `data prepare` has: the encoding model, the storage dtype and the shard layout."""

    model: str | None = field(
        default=None,
        metadata=C.option(
            "--model", "Model whose VAE and text encoders encode the data (the teacher). Required."
        ),
    )
    dtype: DType = field(
        default=DType.FP16,
        metadata=C.option(
            "--dtype",
            "Storage dtype of latents and embeddings (fp32 trains bit-identical to the images).",
            PREPARE,
            choices=DType,
            parser=DType.cli,
            metavar=DTYPE_METAVAR,
        ),
    )
    shard_size: int = field(default=1000, metadata=C.option("--shard-size", "Samples per shard.", PREPARE))
    batch_size: int = field(default=8, metadata=C.option("--batch-size", "Images encoded at once.", PREPARE))
    device: str = field(default="auto", metadata=C.option("--device", DEVICE_HELP, PREPARE))
    resume: bool = field(
        default=False,
        metadata=C.option("--resume", "Continue an interrupted prepare (finished shards are kept).", PREPARE),
    )

    def __post_init__(self) -> None:
        C.coerce_choices(self)


def run(parsed: T.Parsed) -> None:
    from sdcompress.cli._output import emit_json, note, out, success
    from sdcompress.services.data_prepare import DataPrepareRequest, data_prepare

    opts, train, output = parsed[DataPrepareOptions], parsed[C.TrainConfig], parsed[T.OutputOptions]
    request = DataPrepareRequest(
        model=opts.model,
        output=train.output_dir,
        data=parsed[C.DataConfig],
        dtype=str(opts.dtype),
        shard_size=opts.shard_size,
        batch_size=opts.batch_size,
        num_workers=train.num_workers,
        device=opts.device,
        resume=opts.resume,
        overwrite=train.overwrite_policy,
        allow_pickle=output.allow_pickle,
    )
    with _progress_bar(not output.json) as progress:
        result = data_prepare(request, progress)
    if output.json:
        import dataclasses

        emit_json(dataclasses.asdict(result))
    if result.interrupted:
        note(f"interrupted; finished shards are kept in {result.work_dir}: rerun with --resume to continue")
        raise typer.Exit(130)
    if output.json:
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


prepare = app.command("prepare")(
    T.training_command(
        T.TrainingCommand(
            name="data-prepare",
            sections=(DataPrepareOptions, C.DataConfig, C.TrainConfig, T.OutputOptions),
            panels=(None, C.DATA, PREPARE),
            run=run,
            required=("model", "output"),
            only={
                # augmentation is a training-time choice: prepared latents are center crops, unflipped
                C.DataConfig: (
                    "data",
                    "dataset_name",
                    "dataset_split",
                    "image_column",
                    "caption_column",
                    "caption_extension",
                    "resolution",
                    "buckets",
                    "require_captions",
                ),
                C.TrainConfig: ("output", "overwrite", "overwrite_foreign", "num_workers"),
                T.OutputOptions: ("allow_pickle", "json"),
            },
            arguments={"data": "source"},
            config_panel=None,
            helps={
                "data": "Folder of images with .txt captions or metadata.jsonl, or WebDataset .tar shards "
                "(path, {000000..000009} pattern or fsspec URL); or give --dataset-name.",
                "num_workers": "Image loading worker processes.",
            },
            doc="Encode captioned images once into WebDataset shards that `--data` trains from.",
        )
    )
)
