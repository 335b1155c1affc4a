"""Data behind fsspec URLs (`file://`, `s3://`, `https://`, ...): tar shards to prepare, prepared datasets to train from.

fsspec does the transport (it comes with huggingface-hub; `s3://` needs s3fs,
`http(s)://` aiohttp, both through the `scale` extra), so this module only
tells a URL from a local path and joins names onto a URL root.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sdcompress.errors import SdcError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(ref: Any) -> bool:
    """Whether `ref` names a location by URL (`scheme://...`) rather than a local path."""
    return isinstance(ref, str) and bool(_URL.match(ref))


def join(root: str | Path, name: str) -> str | Path:
    """`name` inside `root`: a path under a folder, or a URL under a URL."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else Path(root) / name


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of `url` and the path within it; one sentence when the scheme is not installed."""
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url)
    except ImportError as exc:
        raise SdcError(
            f"reading {url} needs a package fsspec could not import ({exc.name}); "
            "install it with `pip install 'sdcompress[scale]'`."
        ) from exc
    except ValueError as exc:  # unknown protocol
        raise SdcError(f"cannot read {url}: {exc}".rstrip(".") + ".") from exc


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        return bool(fs.exists(path))
    except OSError:
        return False


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of `url` (from `start` to `end` when given: one ranged request, not the whole file)."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path, start=start, end=end)
    except (OSError, ValueError) as exc:  # FileNotFoundError, HTTP errors (aiohttp's are OSError/ValueError)
        raise SdcError(f"could not read {url}: {exc}".rstrip(".") + ".") from exc
