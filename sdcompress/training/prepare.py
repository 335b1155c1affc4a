"""Encoding a captioned image set once into shards: the library side of `sdcompress data prepare`.

The images are found, bucketed, resized and cropped by the trainer's own code
(`training/data.py`: `scan`, `CaptionedImages`), the latents are made by the
trainer's own `vae_latents` and the text embeddings by `encode_prompts`, so a
prepared sample is exactly what the trainer would have computed for that
image at epoch 0 with centre crops and no flip.

Shard `k` holds samples `k * shard_size ...` in scan order and is written
under a temporary name, then renamed, with a small `shard-0000k.json` beside
it (its sample count, bucket numbers and skipped items). Finished shards are
what `--resume` keeps; the same input and settings give the same bytes
(fixed tar mtimes, safetensors' sorted headers), so an interrupted and resumed
run equals an uninterrupted one. `finish` merges the shard records into
`targets.npy` and the index, written last.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdcompress.choices import resolve_dtype
from sdcompress.errors import SdcError
from sdcompress.training import shards as S
from sdcompress.training.config import DataConfig

SETTINGS = "prepare-settings.json"
TAR_MTIME = 0.0  # fixed so that the same samples give the same shard bytes


@dataclass(frozen=True)
class PrepareSettings:
    """What decides the bytes of the shards; a resumed run must use the same."""

    model: str
    data: DataConfig
    dtype: str = "fp16"
    shard_size: int = 1000
    batch_size: int = 8
    allow_pickle: bool = False

    def validate(self) -> None:
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise SdcError(f"--dtype must be fp32, fp16 or bf16, got {self.dtype!r}.")
        if self.shard_size < 1 or self.batch_size < 1:
            raise SdcError("--shard-size and --batch-size must be at least 1; fix the option and run again.")
        if not self.data.center_crop or self.data.random_flip or self.data.caption_dropout:
            raise SdcError(
                "prepared data holds one fixed crop per image; drop --random-crop, --random-flip and "
                "--caption-dropout here (caption dropout is a training option)."
            )

    def record(self) -> dict[str, Any]:
        """The settings as JSON-able data (what a resumed run is compared against)."""
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.data).items()}
        return {**asdict(self), "data": data}


@dataclass
class Encoders:
    """The frozen parts of one model that turn an image and a caption into U-Net inputs."""

    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    family: str
    bucket_step: int
    default_resolution: int

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2


def load_encoders(ref: str, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False) -> Encoders:
    """The VAE, text encoder(s) and tokenizer(s) of one model reference, through the project's resolver.

    The U-Net is not built: a teacher's encoders serve all of its students.
    On the CPU everything runs in fp32 (half is slow and inexact there), as the trainer does.
    """
    from transformers import CLIPTokenizer

    from sdcompress.checkpoint.instantiate import build_module, tokenizer_dir
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.training.data import model_bucket_step

    model = load_model(ref, allow_pickle=allow_pickle)
    names = [s.component for s in model.family.text_encoders]
    missing = [c for c in ("vae", *names) if c not in model.components]
    if missing:
        raise SdcError(f"{ref} has no {', '.join(missing)}; give a whole pipeline (the teacher) as --model.")
    if device.type == "cpu":
        dtype = torch.float32
    vae_dtype = torch.float32 if model.configs["vae"].get("force_upcast", False) else dtype
    vae = build_module(model, "vae", dtype=vae_dtype, device=str(device))
    encoders, tokenizers = [], []
    for name in names:
        encoders.append(build_module(model, name, dtype=dtype, device=str(device)))
        tok = "tokenizer" if name == "text_encoder" else "tokenizer_2"
        tokenizers.append(CLIPTokenizer.from_pretrained(tokenizer_dir(model, tok)))
    return Encoders(
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        family=model.family.name,
        bucket_step=model_bucket_step(model.configs["vae"], model.configs.get("unet", {})),
        default_resolution=model.family.resolution,
    )


@torch.no_grad()
def encode_conditioning(
    encoders: Encoders, captions: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """The stored text conditioning of captions: `prompt_embeds` (and SDXL's `pooled`)."""
    from sdcompress.training.conditioning import encode_prompts

    cond = encode_prompts(encoders.text_encoders, encoders.tokenizers, captions, device)
    out = {"prompt_embeds": cond.hidden_states}
    if cond.pooled is not None:
        out["pooled"] = cond.pooled
    return out


@torch.no_grad()
def encode_batch(encoders: Encoders, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Latents and conditioning of one collated batch (one bucket), as the trainer computes them."""
    from sdcompress.training.task import vae_latents

    vae = encoders.vae
    out = {"latent": vae_latents(vae, batch["pixel_values"].to(device, next(vae.parameters()).dtype))}
    out.update(encode_conditioning(encoders, batch["captions"], device))
    return out


# ---------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class PrepareProgress:
    """What the preparer reports after each batch: samples written (or kept) of the total."""

    done: int
    total: int
    skipped: int
    shard: int
    kept_shards: int = 0


ProgressCallback = Callable[[PrepareProgress], None]


@dataclass
class ShardRecord:
    """What one finished shard holds (its `shard-0000k.json`)."""

    url: str
    nsamples: int
    targets: list[int]
    filesize: int
    missing_captions: int = 0
    skipped: list[str] = field(default_factory=list)
    offsets: list[list[int]] = field(default_factory=list)  # `member_offsets`, one row per sample


# ---------------------------------------------------------------------------- writing


class _SafeSamples(torch.utils.data.Dataset):
    """The trainer's samples at epoch 0; an image that fails to decode becomes None (skipped and counted)."""

    def __init__(self, images) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any] | tuple[int, str]:
        try:
            return self.images[(index, 0)]
        except Exception as exc:  # PIL raises many types for a broken file; all mean "skip it"
            return (index, f"{self.images.records[index].source} ({type(exc).__name__})")


def _collate(samples: list) -> tuple[dict[str, Any] | None, list[tuple[int, str]]]:
    from sdcompress.training.data import collate

    good = [s for s in samples if isinstance(s, dict)]
    bad = [s for s in samples if not isinstance(s, dict)]
    return (collate(good) if good else None), bad


def _shard_batches(targets: list[tuple[int, int]], first: int, last: int, size: int) -> list[list[int]]:
    """The sample numbers of one shard in batches that each hold one bucket, in scan order within it."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index in range(first, last):
        groups.setdefault(targets[index], []).append(index)
    return [m[i : i + size] for t in sorted(groups) for m in [groups[t]] for i in range(0, len(m), size)]


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> list[list[int]]:
    """One WebDataset shard, written under a temporary name and renamed when complete; returns its read index."""
    TarWriter = S.require_webdataset().TarWriter

    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as stream, TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
            for key, members in samples:
                writer.write({"__key__": key, **members})
        offsets = member_offsets(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return offsets


def member_offsets(path: Path) -> list[list[int]]:
    """Per sample, in order: byte offset and size of its safetensors member, then of its JSON member.

    Stored in `offsets.npy`, so a reader goes straight to a sample's bytes without
    parsing the shard's tar headers (see `shards._Shards` for why).
    """
    import tarfile

    members: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            members.setdefault(key, {})[extension] = (member.offset_data, member.size)
    return [[*m["safetensors"], *m["json"]] for m in members.values()]


def source_name(source: Any, data: DataConfig) -> str:
    """The image's name within its source: path relative to the folder, tar member name, or dataset row.

    Relative, so the shards do not depend on where the source lies, and a tar
    made from a folder (keys = relative paths) prepares to the same bytes.
    """
    if isinstance(source, str) and data.data_dir is not None:
        with contextlib.suppress(ValueError):
            return Path(source).relative_to(Path(data.data_dir).expanduser()).as_posix()
    return getattr(source, "name", str(source))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _finished(work: Path, number: int) -> ShardRecord | None:
    meta = work / S.shard_name(number).replace(".tar", ".json")
    if not (meta.is_file() and (work / S.shard_name(number)).is_file()):
        return None
    return ShardRecord(**json.loads(meta.read_text(encoding="utf-8")))


class Preparer:
    """Writes the shards of one scanned image set into a work folder; `finish` adds the index."""

    def __init__(
        self,
        images,
        encoders: Encoders,
        settings: PrepareSettings,
        device: torch.device,
        num_workers: int = 0,
    ) -> None:
        from sdcompress.training.data import bucket_sizes

        self.images = images  # a CaptionedImages: records, targets and the trainer's crops
        self.encoders = encoders
        self.settings = settings
        self.device = device
        self.num_workers = num_workers
        self.storage = resolve_dtype(settings.dtype)
        data = settings.data
        self.buckets = (
            [tuple(b) for b in bucket_sizes(data.resolution, data.bucket_step)]
            if data.buckets
            else [(data.resolution, data.resolution)]
        )
        self.bucket_number = {b: i for i, b in enumerate(self.buckets)}

    @property
    def shard_count(self) -> int:
        return -(-len(self.images) // self.settings.shard_size)

    def shard_numbers(self, rank: int = 0, world: int = 1) -> list[int]:
        """The shards this process writes: every world-th, so ranks never write the same file."""
        return list(range(rank, self.shard_count, world))

    def samples_of(self, rank: int = 0, world: int = 1) -> int:
        """How many images the shards of this rank take in (skipped ones included)."""
        size, count = self.settings.shard_size, len(self.images)
        return sum(min(size, count - n * size) for n in self.shard_numbers(rank, world))

    def run(
        self, work: Path, progress: ProgressCallback | None = None, rank: int = 0, world: int = 1
    ) -> None:
        """Write every missing shard of this rank; finished ones (from an interrupted run) are kept."""
        total = self.samples_of(rank, world)
        done = skipped = kept = 0
        for number in self.shard_numbers(rank, world):
            record = _finished(work, number)
            if record is None:
                record = self._write_shard(work, number)
            else:
                kept += 1
            done += record.nsamples + len(record.skipped)
            skipped += len(record.skipped)
            if progress is not None:
                progress(PrepareProgress(done, total, skipped, number, kept))

    def _write_shard(self, work: Path, number: int) -> ShardRecord:
        size = self.settings.shard_size
        first, last = number * size, min((number + 1) * size, len(self.images))
        batches = _shard_batches(self.images.targets, first, last, self.settings.batch_size)
        loader = torch.utils.data.DataLoader(
            _SafeSamples(self.images),
            batch_sampler=batches,
            collate_fn=_collate,
            num_workers=self.num_workers,
        )
        encoded: dict[int, dict[str, bytes]] = {}
        captions: dict[int, bool] = {}
        skipped: list[str] = []
        for batch, bad in loader:
            skipped += [what for _, what in bad]
            if batch is None:
                continue
            out = encode_batch(self.encoders, batch, self.device)
            for row, index in enumerate(batch["index"].tolist()):
                tensors = {k: v[row].to("cpu", self.storage) for k, v in out.items()}
                record = self.images.records[index]
                captions[index] = record.caption is not None
                meta = {
                    "caption": batch["captions"][row],
                    "original_size": batch["original_sizes"][row].tolist(),
                    "crop_top_left": batch["crop_top_lefts"][row].tolist(),
                    "target_size": batch["target_sizes"][row].tolist(),
                    "source": source_name(record.source, self.settings.data),
                }
                encoded[index] = S.encode_sample(tensors, meta)
        order = sorted(encoded)
        # Keys are scan numbers (unique, with gaps where an image was skipped); readers address a
        # sample by its position, so the dataset's sample n is the n-th kept image in scan order.
        path = work / S.shard_name(number)
        offsets = write_shard(path, [(S.sample_key(i), encoded[i]) for i in order])
        record = ShardRecord(
            url=path.name,
            nsamples=len(order),
            targets=[self.bucket_number[tuple(self.images.targets[i])] for i in order],
            filesize=path.stat().st_size,
            missing_captions=sum(1 for i in order if not captions[i]),
            skipped=sorted(skipped),
            offsets=offsets,
        )
        _write_json(path.with_suffix(".json"), asdict(record))
        return record

    def finish(self, work: Path, source: dict[str, Any], unreadable: list[str]) -> dict[str, Any]:
        """Merge the shard records into `targets.npy`, store the empty prompt, write the index last."""
        records = []
        for number in range(self.shard_count):
            record = _finished(work, number)
            if record is None:
                raise SdcError(f"shard {number} of {work} is missing; run the prepare again with --resume.")
            records.append(record)
        # Encoded in a batch like every caption (not alone): a batch of one runs other matrix
        # kernels on the CPU, whose last bits differ (SDXL's pooled projection shows it).
        empty = encode_conditioning(self.encoders, [""] * self.settings.batch_size, self.device)
        conditioning = {
            "family": self.encoders.family,
            "model": self.settings.model,
            "latent_channels": int(self.encoders.vae.config.latent_channels),
            "text_dim": int(empty["prompt_embeds"].shape[-1]),
            "pooled_dim": int(empty["pooled"].shape[-1]) if "pooled" in empty else None,
        }
        index = write_index(
            work,
            records,
            empty={k: v[0].to("cpu", self.storage) for k, v in empty.items()},
            buckets=self.buckets,
            resolution=self.settings.data.resolution,
            dtype=self.settings.dtype,
            conditioning=conditioning,
            source=source,
            unreadable=unreadable,
        )
        for number in range(self.shard_count):  # the per-shard records live on in the index
            (work / S.shard_name(number)).with_suffix(".json").unlink()
        return index


def write_index(
    work: Path,
    records: list[ShardRecord],
    *,
    empty: dict[str, torch.Tensor],
    buckets: list[tuple[int, int]],
    resolution: int,
    dtype: str,
    conditioning: dict[str, Any],
    source: dict[str, Any],
    unreadable: list[str] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """Finish a dataset whose shards are written: `targets.npy`, the empty prompt, and the index last."""
    from safetensors.torch import save_file

    targets = np.array([t for r in records for t in r.targets], dtype=np.uint16)
    np.save(work / S.TARGETS, targets)
    offsets = np.array([row for r in records for row in r.offsets], dtype=np.int64).reshape(-1, 4)
    np.save(work / S.OFFSETS, offsets)
    save_file({k: v.contiguous() for k, v in empty.items()}, work / S.EMPTY_PROMPT)
    skipped = list(unreadable) + [s for r in records for s in r.skipped]
    index = {
        "format": S.FORMAT,
        "samples": int(len(targets)),
        "shards": [{"url": r.url, "nsamples": r.nsamples, "filesize": r.filesize} for r in records],
        "buckets": [list(b) for b in buckets],
        "resolution": resolution,
        "dtype": dtype,
        "conditioning": conditioning,
        "source": source,
        "missing_captions": sum(r.missing_captions for r in records),
        "skipped": {"count": len(skipped), "examples": skipped[:5]},
    }
    _write_json(work / S.INDEX, index)
    return index
