"""Outputs that appear whole or not at all.

Every file or folder sdcompress writes is first written under a hidden
temporary name in the target directory and renamed into place on success, so
an interrupted job leaves either the old state or the complete new one, and an
existing output is only replaced when the user said `--overwrite`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sdcompress.errors import SdcError


def check_output(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Fail early, before any work, when `path` cannot be written."""
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise SdcError(f"{p} already exists; choose another output path or pass --overwrite.")
    parent = p.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SdcError(
            f"cannot write to {parent}: the directory is not writable; choose another output path."
        )
    return p


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` when the block succeeds."""
    target = check_output(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; move it to `path` when the block succeeds."""
    target = check_output(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
