"""Existing WebDataset tar shards as a source of captioned images (for `data prepare`).

A source such as `shards/{000000..000009}.tar` or `s3://bucket/part-{0..9}.tar`
is expanded and each shard streamed with webdataset's own tar reader
(`tar_file_expander` + `group_by_keys`); fsspec opens the URL (webdataset's
`gopen` would shell out to curl for http and has no s3). A sample is an image
member (`jpg`, `png`, `webp`, ...) with a `txt` caption or a `json` holding the
caption column (`text`/`caption` as in metadata.jsonl). The scan keeps each
sample's shard and member name and its size; the image bytes are streamed
again when the preparer reads that shard's samples (one shard's images are
held per process, since a tar stream cannot seek). A member that does not
decode is skipped and counted like an unreadable image file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sdcompress.errors import SdcError

TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CACHED_SHARDS = 2  # a preparer's shard of samples spans at most a few source shards, read in order


@dataclass(frozen=True)
class TarMember:
    """Where one image lies: its source shard (path or URL) and its member name in it."""

    url: str
    name: str

    def __str__(self) -> str:
        return f"{self.url}:{self.name}"


def is_tar_source(ref: Any) -> bool:
    """Whether a data source names tar shards (a file, a brace pattern or a URL ending in .tar)."""
    return ref is not None and str(ref).lower().endswith(TAR_SUFFIXES)


def shard_urls(ref: str) -> list[str]:
    """The shards a source names, braces expanded (webdataset's own expansion, `::` lists included)."""
    from sdcompress.training.shards import require_webdataset

    require_webdataset()
    from webdataset.shardlists import expand_urls

    return list(expand_urls(str(ref)))


def _samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard as webdataset groups them (`__key__` plus one entry per member suffix)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from sdcompress.training.remote import filesystem, is_url

    try:
        if is_url(url):
            fs, path = filesystem(url)
            opened = fs.open(path, "rb")
        else:
            opened = open(os.path.expanduser(url), "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise SdcError(f"cannot read shard {url} ({exc.strerror or exc}); check the path or URL.") from exc
    with opened as stream:
        try:
            yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        except (OSError, ValueError, EOFError, tarfile.TarError) as exc:  # the stream itself is broken
            raise SdcError(f"shard {url} is not a readable tar ({exc}); replace or drop it.") from exc


def _image_key(sample: dict[str, Any]) -> str | None:
    return next((k for k in IMAGE_KEYS if k in sample), None)


def _caption(sample: dict[str, Any], caption_column: str) -> str | None:
    """The caption of a sample: its `txt` member (stripped, like a sidecar file), else its `json`'s column."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            row = json.loads(sample["json"])
            if isinstance(row, dict):
                text = row.get(caption_column, row.get("text", row.get("caption")))
                return text if isinstance(text, str) else None
    return None


def tar_records(config, stats) -> list:
    """Records of every usable image in the shards; unreadable members are counted in `stats`."""
    from sdcompress.training.data import Record, _probe

    records = []
    for url in shard_urls(config.data_dir):
        for sample in _samples(url):
            image = _image_key(sample)
            where = TarMember(url, f"{sample['__key__']}.{image or '(no image)'}")
            size = _probe(sample[image]) if image else None
            if size is None:
                stats.unreadable += 1
                stats.unreadable_examples.append(str(where))
                continue
            records.append(Record(source=where, caption=_caption(sample, config.caption_column), size=size))
    return records


class _ShardImages:
    """The image bytes of the last few shards read, by member name: a tar stream is read front to back."""

    def __init__(self) -> None:
        self._shards: OrderedDict[str, dict[str, bytes]] = OrderedDict()

    def read(self, member: TarMember) -> bytes:
        images = self._shards.get(member.url)
        if images is None:
            images = {}
            for sample in _samples(member.url):
                key = _image_key(sample)
                if key is not None:
                    images[f"{sample['__key__']}.{key}"] = sample[key]
            self._shards[member.url] = images
            if len(self._shards) > CACHED_SHARDS:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(member.url)
        if member.name not in images:
            raise KeyError(f"{member} is no longer in its shard")
        return images[member.name]


_READER = _ShardImages()  # one per process: DataLoader workers each fill their own


def open_member(member: TarMember):
    """The PIL image of a tar member (decoded lazily, like `Image.open` of a file)."""
    from PIL import Image

    return Image.open(io.BytesIO(_READER.read(member)))
