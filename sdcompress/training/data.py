"""Captioned image data for training: folders, metadata.jsonl, Hugging Face datasets, buckets.

Three sources give the same records (an image and its caption): a kohya folder
(`img.png` + `img.txt`), an imagefolder with `metadata.jsonl` lines
`{"file_name": ..., "text": ...}`, or a Hugging Face dataset (online only; the
`datasets` package is imported lazily). Images that cannot be read are skipped
and counted; images without a caption are kept with an empty caption and
counted, unless captions are required.

Every random choice (crop, flip, caption dropout, data order) is drawn from a
generator seeded by (seed, epoch, index), so the order and the augmentations
are a pure function of the training step. That is what makes `--resume` exact:
the engine skips to the right batch of the right epoch and sees the same data
an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from sdcompress.errors import SdcError
from sdcompress.training.config import DataConfig

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
BUCKET_DIVISIBILITY = 64  # VAE factor 8 x three U-Net downsamples: latents must divide by 8


@dataclass(frozen=True)
class Record:
    """One usable image: where to read it, its caption (None when it had none) and its size (h, w).

    `source` is a file path, a Hugging Face row number, or a `tar_source.TarMember`.
    """

    source: Any
    caption: str | None
    size: tuple[int, int]


@dataclass
class DataStats:
    """What the scan found, for the run summary."""

    images: int = 0
    unreadable: int = 0
    missing_captions: int = 0
    unreadable_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "unreadable": self.unreadable,
            "missing_captions": self.missing_captions,
            "unreadable_examples": self.unreadable_examples[:5],
        }


# ---------------------------------------------------------------------------- scanning


def _probe(path: Path | bytes) -> tuple[int, int] | None:
    """Size (h, w) of a readable image (a file, or a tar member's bytes), or None when it does not decode."""
    import io

    def opened() -> Image.Image:
        return Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)

    try:
        with opened() as im:
            im.verify()
        with opened() as im:
            im = ImageOps.exif_transpose(im)
            return im.height, im.width
    except Exception:  # PIL raises many types for broken files; any of them means "unreadable"
        return None


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _metadata_captions(root: Path, caption_column: str) -> dict[str, str]:
    """Captions from metadata.jsonl, keyed by file name relative to the folder."""
    captions: dict[str, str] = {}
    path = root / "metadata.jsonl"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SdcError(
                f"{path} line {number} is not a JSON object with a file_name; fix or remove that line."
            ) from exc
        text = row.get(caption_column, row.get("text", row.get("caption")))
        if isinstance(text, str):
            captions[str(Path(name))] = text
    return captions


def _folder_records(config: DataConfig, stats: DataStats) -> list[Record]:
    root = Path(config.data_dir).expanduser()  # type: ignore[arg-type]
    if not root.is_dir():
        raise SdcError(f"data folder {root} does not exist; pass a folder of images with --data.")
    has_metadata = (root / "metadata.jsonl").is_file()
    metadata = _metadata_captions(root, config.caption_column) if has_metadata else {}
    records = []
    for path in _image_files(root):
        size = _probe(path)
        if size is None:
            stats.unreadable += 1
            stats.unreadable_examples.append(str(path))
            continue
        if has_metadata:
            caption = metadata.get(str(path.relative_to(root)))
        else:
            sidecar = path.with_suffix(config.caption_extension)
            caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
        records.append(Record(source=str(path), caption=caption, size=size))
    return records


def _load_hf_dataset(config: DataConfig):
    try:
        import datasets
    except ImportError as exc:
        raise SdcError(
            "--dataset-name needs the `datasets` package; install it with `pip install datasets`."
        ) from exc
    try:
        return datasets.load_dataset(config.dataset_name, split=config.dataset_split)
    except Exception as exc:  # network, missing split, unknown name: all user-fixable
        raise SdcError(f"could not load dataset {config.dataset_name!r}: {exc}".rstrip(".") + ".") from exc


def _as_pil(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        import io

        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    if isinstance(value, str):
        return Image.open(value)
    raise TypeError(f"not an image: {type(value).__name__}")


def _hf_records(config: DataConfig, dataset, stats: DataStats) -> list[Record]:
    columns = set(dataset.column_names)
    for option, column in (
        ("--image-column", config.image_column),
        ("--caption-column", config.caption_column),
    ):
        if column not in columns:
            raise SdcError(
                f"dataset {config.dataset_name!r} has no column {column!r}; "
                f"pass {option} with one of {sorted(columns)}."
            )
    records = []
    for row_index in range(len(dataset)):
        row = dataset[row_index]
        try:
            image = ImageOps.exif_transpose(_as_pil(row[config.image_column]))
            size = (image.height, image.width)
        except Exception:
            stats.unreadable += 1
            stats.unreadable_examples.append(f"row {row_index}")
            continue
        caption = row[config.caption_column]
        records.append(
            Record(source=row_index, caption=caption if isinstance(caption, str) else None, size=size)
        )
    return records


def scan(config: DataConfig) -> tuple[list[Record], DataStats, Any]:
    """Find every usable image; returns the records, the counts, and the HF dataset (or None)."""
    from sdcompress.training import tar_source

    config.validate()
    stats = DataStats()
    hf_dataset = None
    if config.dataset_name is not None:
        hf_dataset = _load_hf_dataset(config)
        records = _hf_records(config, hf_dataset, stats)
        where = f"dataset {config.dataset_name!r}"
    elif tar_source.is_tar_source(config.data_dir):
        records = tar_source.tar_records(config, stats)
        where = f"{config.data_dir}"
    else:
        records = _folder_records(config, stats)
        where = f"{config.data_dir}"
    if not records:
        detail = f" ({stats.unreadable} unreadable)" if stats.unreadable else ""
        raise SdcError(
            f"no usable images in {where}{detail}; add .png/.jpg images with .txt captions "
            "or a metadata.jsonl there."
        )
    missing = [r for r in records if r.caption is None]
    stats.missing_captions = len(missing)
    if missing and config.require_captions:
        raise SdcError(
            f"{len(missing)} of {len(records)} images have no caption (first: {missing[0].source}); "
            "add their captions or drop --require-captions to train them with an empty caption."
        )
    stats.images = len(records)
    return records, stats, hf_dataset


# ---------------------------------------------------------------------------- buckets and order


def bucket_sizes(resolution: int, step: int = BUCKET_DIVISIBILITY) -> list[tuple[int, int]]:
    """The (h, w) buckets for a pixel budget of resolution**2, each side a multiple of `step`."""
    try:
        from diffusers.training_utils import generate_aspect_ratio_buckets
    except ImportError:  # diffusers < 0.40 (our floor is 0.35) lacks it: the same ladder, computed here
        return _bucket_ladder(resolution, step)
    return generate_aspect_ratio_buckets(resolution, divisibility=step)


# Width:height ratios of the bucket ladder, as diffusers >= 0.40 spaces them: square, then each
# portrait/landscape pair from 4:5 out to 1:2. Only `_bucket_ladder` reads it.
_LADDER_RATIOS = ((1, 1), (4, 5), (5, 4), (2, 3), (3, 2), (3, 4), (4, 3), (9, 16), (16, 9), (1, 2), (2, 1))


def _bucket_ladder(resolution: int, step: int) -> list[tuple[int, int]]:
    """Buckets of about resolution**2 pixels at each ladder ratio, sides rounded to multiples of `step`.

    Gives what diffusers' `generate_aspect_ratio_buckets` gives (a test compares the two where it
    exists), so a data set gets the same buckets whichever diffusers is installed.
    """
    sizes: list[tuple[int, int]] = []
    for ratio_w, ratio_h in _LADDER_RATIOS:
        aspect = ratio_w / ratio_h
        height = (resolution * resolution / aspect) ** 0.5  # h * w = resolution**2 and w / h = aspect
        width = height * aspect
        size = (max(step, round(height / step) * step), max(step, round(width / step) * step))
        if size not in sizes:
            sizes.append(size)
    return sizes


def model_bucket_step(vae_config: dict, unet_config: dict) -> int:
    """Pixels a bucket side must divide by for this model: the VAE's and the U-Net's downsampling."""
    vae_factor = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    unet_factor = 2 ** (len(unet_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return vae_factor * unet_factor


def assign_buckets(records: Sequence[Record], config: DataConfig) -> list[tuple[int, int]]:
    """Target size (h, w) for each record: a square of `resolution`, or its nearest-aspect bucket."""
    if config.resolution is None:
        raise SdcError("no training resolution set; give --resolution (the services use the model's).")
    if not config.buckets:
        return [(config.resolution, config.resolution)] * len(records)
    from diffusers.training_utils import find_nearest_bucket

    options = bucket_sizes(config.resolution, config.bucket_step)
    return [options[find_nearest_bucket(r.size[0], r.size[1], options)] for r in records]


def _rng(seed: int, *parts: int) -> random.Random:
    """A generator for one (seed, epoch, index, ...) tuple: same inputs, same draws, on any rank."""
    value = seed
    for part in parts:
        value = value * 1_000_003 + part
    return random.Random(value)


class EpochPlan(Sequence):
    """One epoch's batches as three integer arrays: the sample order, each batch's start and size.

    A list of lists would hold a Python int per sample (about 70 bytes each: 0.35 GB at 5M
    samples, built on every epoch start); these arrays take 8 bytes a sample and a batch becomes a
    list only when the loader asks for it. Slicing gives a view, so ranks and resumes cost nothing.
    """

    def __init__(self, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> None:
        self.order, self.starts, self.sizes = order, starts, sizes

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return EpochPlan(self.order, self.starts[index], self.sizes[index])
        start = int(self.starts[index])
        return self.order[start : start + int(self.sizes[index])].tolist()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def renumbered(self, numbers: np.ndarray) -> EpochPlan:
        """The same batches with each position i replaced by numbers[i] (a subset's own sample numbers)."""
        return EpochPlan(numbers[self.order], self.starts, self.sizes)


def _bucket_ids(targets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Each sample's bucket as its rank among the distinct target sizes (sorted), as an array."""
    numbers, buckets = getattr(targets, "numbers", None), getattr(targets, "buckets", None)
    if numbers is not None and buckets is not None:  # prepared data: bucket numbers, memory-mapped
        ranks = np.empty(len(buckets), dtype=np.int64)
        ranks[sorted(range(len(buckets)), key=lambda b: tuple(buckets[b]))] = np.arange(len(buckets))
        return ranks[np.asarray(numbers, dtype=np.int64)]
    rank = {target: i for i, target in enumerate(sorted(set(targets)))}
    return np.fromiter((rank[t] for t in targets), dtype=np.int64, count=len(targets))


def epoch_batches(targets: Sequence[tuple[int, int]], batch_size: int, seed: int, epoch: int) -> EpochPlan:
    """Every batch of one epoch, in order: shuffled within each bucket, then the batches shuffled.

    A batch never mixes buckets, so its images stack into one tensor. The order
    depends only on (seed, epoch), so a resumed run sees the same batches. numpy's
    legacy `RandomState` draws it: its stream is frozen across numpy versions, so a
    resume after an upgrade still sees the same order.
    """
    ids = _bucket_ids(targets)
    rng = np.random.RandomState(_rng(seed, epoch, 0x5EED).getrandbits(32))
    shuffled = rng.permutation(len(ids))
    order = shuffled[np.argsort(ids[shuffled], kind="stable")]  # grouped by bucket, shuffled within
    counts = np.bincount(ids) if len(ids) else np.zeros(0, dtype=np.int64)
    firsts = np.cumsum(counts) - counts
    starts = np.concatenate(
        [np.arange(f, f + c, batch_size) for f, c in zip(firsts, counts, strict=True)] or [np.zeros(0)]
    ).astype(np.int64)
    ends = np.repeat(firsts + counts, (counts + batch_size - 1) // batch_size)
    sizes = np.minimum(ends - starts, batch_size)
    batch_order = rng.permutation(len(starts))
    return EpochPlan(order, starts[batch_order], sizes[batch_order])


def rank_batches(batches: Sequence[list[int]], rank: int, world: int) -> Sequence[list[int]]:
    """This process's share of the epoch: every world-th batch, equal counts on every rank."""
    per_rank = len(batches) // world
    if per_rank == 0:
        raise SdcError(
            f"the data set gives {len(batches)} batch(es) per epoch, fewer than the {world} processes; "
            "add images or lower --batch-size."
        )
    return batches[rank : per_rank * world : world]


def plan_epoch(
    dataset: Any, batch_size: int, seed: int, epoch: int, rank: int, world: int
) -> Sequence[list[int]]:
    """This process's batches of one epoch; a dataset may plan its own (prepared shards: one rank, own shards)."""
    own = getattr(dataset, "rank_batches", None)
    if own is not None and world > 1:
        return own(batch_size, seed, epoch, rank, world)
    return rank_batches(epoch_batches(dataset.targets, batch_size, seed, epoch), rank, world)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields one epoch's batches for this rank, starting at batch `skip`; keys carry the epoch."""

    def __init__(self, batches: Sequence[list[int]], epoch: int, skip: int = 0) -> None:
        self.batches = batches
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches[self.skip :]:
            yield [(index, self.epoch) for index in batch]

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)


# ---------------------------------------------------------------------------- samples


def crop_and_resize(
    image: Image.Image, target: tuple[int, int], *, center: bool, flip: bool, rng: random.Random
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale `image` to cover `target` (h, w), crop it, maybe flip it; returns it and the crop's (top, left).

    The crop corner is what SDXL's micro-conditioning expects: in the resized
    image's pixels, mirrored when the image was flipped.
    """
    th, tw = target
    scale = max(th / image.height, tw / image.width)
    rh, rw = max(th, round(image.height * scale)), max(tw, round(image.width * scale))
    image = image.resize((rw, rh), Image.BICUBIC)
    if center:
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    image = image.crop((left, top, left + tw, top + th))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = rw - left - tw
    return image, (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W) in [-1, 1], as the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class CaptionedImages(torch.utils.data.Dataset):
    """Records turned into training samples; indexed by (record index, epoch) keys from the sampler."""

    def __init__(self, records: list[Record], config: DataConfig, seed: int, hf_dataset: Any = None) -> None:
        self.records = records
        self.config = config
        self.seed = seed
        self.hf_dataset = hf_dataset
        self.targets = assign_buckets(records, config)

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, record: Record) -> Image.Image:
        if isinstance(record.source, int):
            image = _as_pil(self.hf_dataset[record.source][self.config.image_column])
        elif not isinstance(record.source, str):  # a member of a tar shard
            from sdcompress.training.tar_source import open_member

            image = open_member(record.source)
        else:
            image = Image.open(record.source)
        return ImageOps.exif_transpose(image).convert("RGB")

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        record = self.records[index]
        rng = _rng(self.seed, epoch, index)
        flip = self.config.random_flip and rng.random() < 0.5
        drop = self.config.caption_dropout > 0 and rng.random() < self.config.caption_dropout
        image, crop = crop_and_resize(
            self._open(record), self.targets[index], center=self.config.center_crop, flip=flip, rng=rng
        )
        return {
            "index": index,
            "pixel_values": to_tensor(image),
            "caption": "" if drop or record.caption is None else record.caption,
            "original_size": record.size,
            "crop_top_left": crop,
            "target_size": self.targets[index],
        }


# Per-sample tensors a batch stacks: pixels from images, or what a prepared dataset stored instead.
STACKED = ("pixel_values", "latents", "prompt_embeds", "pooled")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one bucket's samples into a batch."""
    batch = {
        "index": torch.tensor([s["index"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "original_sizes": torch.tensor([s["original_size"] for s in samples]),
        "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples]),
        "target_sizes": torch.tensor([s["target_size"] for s in samples]),
    }
    for key in STACKED:
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


def build_dataset(config: DataConfig, seed: int) -> tuple[torch.utils.data.Dataset, DataStats]:
    """Scan the source and wrap the usable images as a dataset; a prepared dataset is opened, not scanned."""
    from sdcompress.training import shards
    from sdcompress.training.remote import is_url
    from sdcompress.training.tar_source import is_tar_source

    if config.dataset_name is None and shards.is_prepared(config.data_dir):
        return shards.open_prepared(config, seed)
    if config.dataset_name is None and (is_url(config.data_dir) or is_tar_source(config.data_dir)):
        # A tar stream cannot seek: training's shuffled order would re-read a whole shard per image.
        raise SdcError(
            f"{config.data_dir} is not a prepared dataset (no {shards.INDEX}); run `sdcompress data prepare` "
            "on it and train from the result, or train from a local image folder."
        )
    records, stats, hf_dataset = scan(config)
    return CaptionedImages(records, config, seed, hf_dataset), stats
