"""`data prepare`: encode a captioned image set once into shards of latents and text embeddings.

The shards are written into a work folder beside the output (`OUT.prepare`),
which is what an interrupted run leaves and `--resume` continues; the finished
dataset (shards, `targets.npy`, the empty-prompt embedding and the index) is
then published to OUT in one move, so OUT is either absent or complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdcompress.checkpoint.atomic import Overwrite, atomic_dir, check_output
from sdcompress.choices import resolve_dtype
from sdcompress.errors import SdcError
from sdcompress.training import remote, shards, tar_source
from sdcompress.training.config import DataConfig
from sdcompress.training.prepare import SETTINGS, PrepareProgress, PrepareSettings, ProgressCallback


@dataclass(frozen=True)
class DataPrepareRequest:
    """Which images, encoded by which model, into which shards."""

    model: str
    output: Path
    data: DataConfig
    dtype: str = "fp16"
    shard_size: int = 1000
    batch_size: int = 8
    num_workers: int = 0
    device: str = "auto"
    resume: bool = False
    overwrite: bool | Overwrite = False
    allow_pickle: bool = False


@dataclass
class DataPrepareResult:
    output: Path | None
    work_dir: Path
    samples: int
    shards: int
    kept_shards: int
    skipped: int
    skipped_examples: list[str]
    missing_captions: int
    interrupted: bool
    seconds: float
    samples_per_s: float
    family: str
    resolution: int
    buckets: int
    conditioning: dict[str, Any] = field(default_factory=dict)


def work_dir_of(output: Path) -> Path:
    """Where the shards of an unfinished prepare live (beside the output, like `OUT.train`)."""
    return output.with_name(output.name + ".prepare")


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (`data.resolution`), so a changed option can be named."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_resume(work: Path, settings: PrepareSettings, resume: bool) -> None:
    """An existing work folder is continued only with --resume, and only with the settings it was made with."""
    saved = work / SETTINGS
    if not work.exists():
        return
    if not resume:
        raise SdcError(
            f"{work} holds an interrupted prepare; pass --resume to continue it, or delete it to start over."
        )
    try:
        before = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SdcError(
            f"{work} is not a prepare work folder (no {SETTINGS}); delete it to start over."
        ) from exc
    now = _flat(json.loads(json.dumps(settings.record())))
    before = _flat(before)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise SdcError(
            f"{work} was started with other settings ({', '.join(changed)}); resume with the same options, "
            "or delete it to start over."
        )


def _process_state():
    """This process's rank among those `accelerate launch` started (one process when run directly)."""
    from accelerate import PartialState

    return PartialState(cpu=not __import__("torch").cuda.is_available())


def _check_source(data: DataConfig) -> None:
    """One data source, and a folder that exists, before any model is loaded."""
    if (data.data_dir is None) == (data.dataset_name is None):
        raise SdcError("give one data source: a folder of images (SOURCE) or --dataset-name NAME.")
    if tar_source.is_tar_source(data.data_dir):
        return  # shards are opened (and a missing one named) by the scan
    if remote.is_url(data.data_dir):
        raise SdcError(
            f"{data.data_dir} names no .tar shards; give WebDataset shards (e.g. .../{{000000..000009}}.tar) "
            "or a local folder of images."
        )
    if data.data_dir is not None and not Path(data.data_dir).expanduser().is_dir():
        raise SdcError(
            f"{data.data_dir} is not a folder; give a folder of images with .txt captions or metadata.jsonl, "
            "or .tar shards."
        )
    if shards.is_prepared(data.data_dir):
        raise SdcError(
            f"{data.data_dir} is already a prepared dataset; give the folder of images it came from."
        )


def _images(data: DataConfig):
    """The scanned source as the trainer sees it (records, buckets, crops); the scan's counts too."""
    from sdcompress.training.data import CaptionedImages, scan

    records, stats, hf_dataset = scan(data)
    return CaptionedImages(records, data, seed=0, hf_dataset=hf_dataset), stats


def _publish(preparer, work: Path, output: Path, request: DataPrepareRequest, stats, source: str) -> dict:
    """The index (written last), then the finished dataset moved to OUT in one step; the work folder goes."""
    index = preparer.finish(
        work, {"data": source, "images": stats.images + stats.unreadable}, list(stats.unreadable_examples)
    )
    (work / SETTINGS).unlink()
    with atomic_dir(output, overwrite=request.overwrite) as tmp:
        for entry in sorted(os.listdir(work)):
            os.replace(work / entry, tmp / entry)
    shutil.rmtree(work, ignore_errors=True)
    return index


def data_prepare(request: DataPrepareRequest, progress: ProgressCallback | None = None) -> DataPrepareResult:
    """Prepare (or resume preparing) a dataset and publish it to `request.output`."""

    from sdcompress.devices import resolve_device
    from sdcompress.training.prepare import Preparer, load_encoders

    started = time.perf_counter()
    state = _process_state()
    rank, world = state.process_index, state.num_processes
    source_ref = request.data.data_dir or request.data.dataset_name
    output = check_output(
        request.output, overwrite=request.overwrite, inputs=[request.data.data_dir, request.model], kind="dir"
    )
    work = work_dir_of(output)
    _check_source(request.data)
    device = state.device if world > 1 and request.device == "auto" else resolve_device(request.device)
    storage = resolve_dtype(request.dtype)
    PrepareSettings(
        request.model, request.data, request.dtype, request.shard_size, request.batch_size
    ).validate()
    encoders = load_encoders(request.model, device, storage, allow_pickle=request.allow_pickle)
    data = replace(
        request.data,
        resolution=request.data.resolution or encoders.default_resolution,
        bucket_step=encoders.bucket_step,
    )
    data.validate()
    if data.resolution % data.bucket_step:
        raise SdcError(
            f"--resolution {data.resolution} does not fit this model; use a multiple of {data.bucket_step}."
        )
    settings = PrepareSettings(request.model, data, request.dtype, request.shard_size, request.batch_size)
    _check_resume(work, settings, request.resume)
    images, stats = _images(data)
    preparer = Preparer(images, encoders, settings, device, num_workers=request.num_workers)
    state.wait_for_everyone()  # every rank has checked the work folder before the main one writes it
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        (work / SETTINGS).write_text(
            json.dumps(settings.record(), indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
    state.wait_for_everyone()

    kept = 0
    last = PrepareProgress(0, preparer.samples_of(rank, world), 0, -1)

    def report(event: PrepareProgress) -> None:
        nonlocal kept, last
        kept, last = event.kept_shards, event
        if progress is not None and rank == 0:  # one bar: the main process's own shards
            progress(event)

    report(last)
    interrupted = False
    encoding_started = time.perf_counter()
    try:
        preparer.run(work, report, rank, world)
    except KeyboardInterrupt:
        interrupted = True
    index: dict[str, Any] = {}
    published = None
    if not interrupted:
        state.wait_for_everyone()  # every rank's shards are written
        if rank == 0:
            index = _publish(preparer, work, output, request, stats, str(source_ref))
        state.wait_for_everyone()
        published = output
        index = index or json.loads((output / shards.INDEX).read_text(encoding="utf-8"))
    seconds = time.perf_counter() - started
    written = last.done - last.skipped
    kept_samples = min(kept * request.shard_size, written)  # kept shards are full unless one is the last
    encoding = time.perf_counter() - encoding_started
    skipped = index.get("skipped", {})
    return DataPrepareResult(
        output=published,
        work_dir=work,
        samples=int(index.get("samples", written)),
        shards=len(index.get("shards", [])) or preparer.shard_count,
        kept_shards=kept,
        skipped=int(skipped.get("count", last.skipped + stats.unreadable)),
        skipped_examples=list(skipped.get("examples", stats.unreadable_examples[:5])),
        missing_captions=int(index.get("missing_captions", 0)),
        interrupted=interrupted,
        seconds=seconds,
        samples_per_s=(written - kept_samples) / encoding if encoding > 0 else 0.0,
        family=encoders.family,
        resolution=data.resolution,
        buckets=len(preparer.buckets),
        conditioning=index.get("conditioning", {}),
    )
