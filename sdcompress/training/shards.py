"""Prepared training data: WebDataset tar shards of latents and text embeddings, and their index.

A prepared dataset is a folder (written by `sdcompress data prepare`, see
`training/prepare.py`) holding:

- `shard-00000.tar`, ...: WebDataset shards; sample KEY is `KEY.safetensors`
  (`latent`, `prompt_embeds`, and `pooled` for SDXL) plus `KEY.json` (caption,
  original size, crop top-left, target size, source);
- `targets.npy`: one bucket number per sample, memory-mapped at start-up;
- `offsets.npy`: where each sample's two members start in its shard, and their sizes;
- `empty-prompt.safetensors`: the empty caption's conditioning (caption dropout);
- `sdcompress-shards.json`: the index, written last, so a folder without it
  is not a dataset.

Samples are addressed by their global number and read with one `pread` per
member, so the engine's own sampler (`training/data.py`, a pure function of seed
and epoch) decides the order and `--resume` stays exact; nothing is scanned at
start-up and nothing per sample is held in memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdcompress.errors import SdcError
from sdcompress.training import remote

INDEX = "sdcompress-shards.json"
TARGETS = "targets.npy"
OFFSETS = "offsets.npy"
EMPTY_PROMPT = "empty-prompt.safetensors"
FORMAT = "sdcompress-shards/1"
OPEN_SHARDS = 64  # shard files kept open per process (one file descriptor each)


def is_prepared(path: Path | str | None) -> bool:
    """Whether `path` is a prepared dataset (a folder or URL with the index), not a folder of images."""
    if remote.is_url(path):
        return remote.exists(str(remote.join(path, INDEX)))  # type: ignore[arg-type]
    return path is not None and (Path(path).expanduser() / INDEX).is_file()


def _file(root: Path | str, name: str) -> Path | str:
    """A file of the dataset: a path under a folder, a URL under a URL."""
    return remote.join(root, name)


def _read(root: Path | str, name: str) -> bytes:
    where = _file(root, name)
    return remote.read_bytes(where) if remote.is_url(root) else Path(where).read_bytes()  # type: ignore[arg-type]


def _load_array(root: Path | str, name: str) -> np.ndarray:
    """A per-sample array: memory-mapped from a folder; read once into memory from a URL (2-32 bytes a sample)."""
    if remote.is_url(root):
        return np.load(io.BytesIO(_read(root, name)))
    return np.load(Path(root) / name, mmap_mode="r")


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.tar"


def sample_key(number: int) -> str:
    """The key of global sample `number` inside its shard (no dots: WebDataset readers split member names at the first)."""
    return f"{number:09d}"


def require_webdataset():
    """The webdataset module (the shard writer), or one sentence saying how to install it."""
    try:
        import webdataset
    except ImportError as exc:
        raise SdcError(
            "writing prepared datasets needs webdataset; install it with `pip install 'sdcompress[scale]'`."
        ) from exc
    return webdataset


# ---------------------------------------------------------------------------- encoding one sample


def encode_sample(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, bytes]:
    """The tar members of one sample: its tensors as safetensors bytes (bf16 survives), its metadata as JSON."""
    from safetensors.torch import save

    return {
        "safetensors": save({k: v.contiguous() for k, v in tensors.items()}),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def decode_sample(tensors: bytes, meta: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata back from a sample's two members."""
    from safetensors.torch import load

    return load(tensors), json.loads(meta)


# ---------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class ShardIndex:
    """The parsed index of a prepared dataset."""

    root: Path | str  # a folder, or a URL (str)
    data: dict[str, Any]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return [tuple(b) for b in self.data["buckets"]]

    @property
    def samples(self) -> int:
        return int(self.data["samples"])

    @property
    def conditioning(self) -> dict[str, Any]:
        return self.data["conditioning"]


def read_index(root: Path | str) -> ShardIndex:
    """Read and check a prepared dataset's index (one sentence when it is not one we can read)."""
    url = remote.is_url(root)
    root = str(root) if url else Path(root).expanduser()
    path = _file(root, INDEX)
    try:
        data = json.loads(_read(root, INDEX))
    except (OSError, ValueError, SdcError) as exc:
        raise SdcError(f"{path} is not a readable index; prepare the dataset again.") from exc
    found = data.get("format") if isinstance(data, dict) else None
    if found != FORMAT:
        raise SdcError(
            f"{path} is not an index this sdcompress reads (format {found!r}, expected {FORMAT!r}); "
            "prepare the dataset again."
        )

    def present(name: str) -> bool:
        where = _file(root, name)
        return remote.exists(where) if url else Path(where).is_file()  # type: ignore[arg-type]

    try:
        # One request per shard for a URL: per shard, not per sample, so start-up stays flat in samples.
        missing = [s["url"] for s in data["shards"] if not present(s["url"])]
    except (KeyError, TypeError) as exc:
        raise SdcError(f"{path} has no valid shard list; prepare the dataset again.") from exc
    missing += [name for name in (TARGETS, OFFSETS, EMPTY_PROMPT) if not present(name)]
    if missing:
        what = missing[0]
        raise SdcError(f"prepared dataset {root} lacks {what}; copy the whole folder or prepare it again.")
    return ShardIndex(root, data)


class BucketTargets(Sequence):
    """Each sample's target size (h, w), read from the memory-mapped bucket numbers.

    The engine's sampler only needs `len` and item access, so start-up reads no
    sample and holds no per-sample Python object.
    """

    def __init__(self, numbers: np.ndarray, buckets: list[tuple[int, int]]) -> None:
        self.numbers = numbers
        self.buckets = buckets

    def __len__(self) -> int:
        return len(self.numbers)

    def __iter__(self):
        buckets = self.buckets
        return (buckets[n] for n in self.numbers.tolist())

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self.buckets[int(n)] for n in self.numbers[index]]
        return self.buckets[int(self.numbers[index])]


# ---------------------------------------------------------------------------- reading


class _Shards:
    """Reads sample n's bytes straight from its shard, at the offsets `offsets.npy` holds.

    Our own few lines instead of wids' reader: wids parses every tar header of a
    shard each time it opens it (in Python) and keeps that parse only while the
    shard stays open, so random access over more shards than it keeps open ran at
    26 samples/s on 100K samples (docs/benchmarks.md); wids' stored indexes are
    pickles, which a downloaded dataset must not make us load. The shards stay
    plain WebDataset tars; only the byte offsets are precomputed when they are written.
    """

    def __init__(self, index: ShardIndex) -> None:
        self.root = index.root
        self.urls = [s["url"] for s in index.shards]
        self.ends = np.cumsum([s["nsamples"] for s in index.shards])
        self.offsets = _load_array(index.root, OFFSETS)
        self.remote = remote.is_url(index.root)
        self._files: OrderedDict[int, int] = OrderedDict()

    def _fd(self, number: int) -> int:
        """An open descriptor of shard `number`; the least recently used one is closed past OPEN_SHARDS."""
        fd = self._files.get(number)
        if fd is None:
            fd = os.open(Path(self.root) / self.urls[number], os.O_RDONLY)
            self._files[number] = fd
            if len(self._files) > OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(number)
        return fd

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position in the shard) of global sample `index`."""
        number = int(np.searchsorted(self.ends, index, side="right"))
        start = 0 if number == 0 else int(self.ends[number - 1])
        return number, index - start

    def samples_of(self, numbers) -> np.ndarray:
        """The global sample numbers held by the given shards, in order."""
        ranges = [np.arange(0 if n == 0 else self.ends[n - 1], self.ends[n]) for n in numbers]
        return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)

    def read(self, index: int) -> tuple[bytes, bytes]:
        """The safetensors and JSON bytes of sample `index`."""
        number = self.locate(index)[0]
        st_offset, st_size, meta_offset, meta_size = (int(v) for v in self.offsets[index])
        if self.remote:  # one ranged request covering both members (they lie side by side in the tar)
            start = min(st_offset, meta_offset)
            end = max(st_offset + st_size, meta_offset + meta_size)
            data = remote.read_bytes(str(_file(self.root, self.urls[number])), start, end)
            return (
                data[st_offset - start : st_offset - start + st_size],
                data[meta_offset - start : meta_offset - start + meta_size],
            )
        fd = self._fd(number)
        return os.pread(fd, st_size, st_offset), os.pread(fd, meta_size, meta_offset)

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        """A DataLoader worker opens its own descriptors."""
        return {**self.__dict__, "_files": OrderedDict()}


class PreparedDataset(torch.utils.data.Dataset):
    """A prepared dataset as the engine's map-style dataset: keys are (sample, epoch) like `CaptionedImages`.

    A sample carries `latents`, `prompt_embeds` (and `pooled`) instead of
    pixels; the only random draw left is caption dropout, taken from the same
    (seed, epoch, index) generator as for images, so both paths drop the same
    captions.
    """

    def __init__(self, index: ShardIndex, config, seed: int) -> None:
        self.index = index
        self.config = config
        self.seed = seed
        numbers = _load_array(index.root, TARGETS)
        if len(numbers) != index.samples:
            raise SdcError(
                f"{_file(index.root, TARGETS)} lists {len(numbers)} samples, the index {index.samples}; "
                "prepare the dataset again."
            )
        self.targets = BucketTargets(numbers, index.buckets)
        self._shards = _Shards(index)
        self._empty: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.index.samples

    def rank_batches(self, batch_size: int, seed: int, epoch: int, rank: int, world: int):
        """With several processes, each reads only its own shards (every world-th): no two ranks open one.

        Within its shards a rank shuffles as `epoch_batches` does (seeded by seed, epoch and rank);
        every rank keeps as many batches as the rank with the fewest, so all take the same steps.
        """
        from sdcompress.training.data import epoch_batches

        if len(self.index.shards) < world:
            raise SdcError(
                f"{self.index.root} has {len(self.index.shards)} shard(s), fewer than the {world} processes; "
                "prepare it again with a smaller --shard-size."
            )
        plans = []
        for r in range(world):
            owned = self._shards.samples_of(range(r, len(self.index.shards), world))
            mine = BucketTargets(self.targets.numbers[owned], self.targets.buckets)
            plans.append(epoch_batches(mine, batch_size, seed * world + r, epoch).renumbered(owned))
        common = min(len(p) for p in plans)
        if common == 0:
            raise SdcError(
                f"some of the {world} processes get no full batch from {self.index.root}; "
                "lower --batch-size or prepare it with a smaller --shard-size."
            )
        return plans[rank][:common]

    def _empty_prompt(self) -> dict[str, torch.Tensor]:
        if self._empty is None:
            from safetensors.torch import load

            self._empty = load(_read(self.index.root, EMPTY_PROMPT))
        return self._empty

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        from sdcompress.training.data import _rng

        index, epoch = key
        tensors, meta = decode_sample(*self._shards.read(index))
        rng = _rng(self.seed, epoch, index)
        # Same draw as CaptionedImages: flip is refused for prepared data, so dropout is the first draw.
        drop = self.config.caption_dropout > 0 and rng.random() < self.config.caption_dropout
        cond = self._empty_prompt() if drop else tensors
        sample = {
            "index": index,
            "latents": tensors["latent"],
            "prompt_embeds": cond["prompt_embeds"],
            "caption": "" if drop else meta["caption"],
            "original_size": tuple(meta["original_size"]),
            "crop_top_left": tuple(meta["crop_top_left"]),
            "target_size": tuple(meta["target_size"]),
        }
        if "pooled" in tensors:
            sample["pooled"] = cond["pooled"]
        return sample


def check_training_options(config) -> None:
    """Refuse data options a prepared dataset cannot honour (its crops were fixed when it was prepared)."""
    if not config.center_crop or config.random_flip:
        raise SdcError(
            f"{config.data_dir} is a prepared dataset whose crops were fixed when it was prepared; "
            "drop --random-crop and --random-flip, or train from the image folder."
        )


def open_prepared(config, seed: int):
    """The dataset and its scan statistics (from the index: nothing is scanned) for `--data SHARDS`."""
    from sdcompress.training.data import DataStats

    check_training_options(config)
    index = read_index(config.data_dir)
    skipped = index.data.get("skipped", {})
    stats = DataStats(
        images=index.samples,
        unreadable=int(skipped.get("count", 0)),
        missing_captions=int(index.data.get("missing_captions", 0)),
        unreadable_examples=list(skipped.get("examples", [])),
    )
    return PreparedDataset(index, config, seed), stats
