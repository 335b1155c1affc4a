"""Outputs that appear whole or not at all, replace only what sdcompress wrote, and respect the umask.

Every file or folder sdcompress writes is first written under a hidden
temporary name in the target directory and renamed into place on success, so
an interrupted job leaves either the old state or the complete new one. The
rules every command shares live here, in `check_output`:

- an output that is, contains, or lies inside one of the job's inputs is
  refused (paths compared after resolving symlinks): inputs are never modified;
- an existing output is replaced only with `--overwrite`, and a folder only
  when every file in it is one sdcompress wrote there. Each folder we publish
  carries a small manifest (`MANIFEST`) listing the files we wrote; a file not
  in it (a user's `notes.txt`, a folder we never wrote) makes the folder
  foreign, and replacing it needs `--overwrite-foreign`. A single-file output
  is one file the user named, so `--overwrite` replaces it;
- the output's filesystem must have room for a write whose size is known, and
  a full disk during the write becomes one sentence naming the filesystem and
  the bytes needed (the temporary output removed, the old output untouched).

Temporary files (`mkstemp`) are 0600 and temporary folders (`mkdtemp`) 0700,
and safetensors >= 0.8 writes every file through a 0600 temporary file too.
Published outputs get the mode a plain `open()`/`mkdir()` gives under the
current umask (or, with `--overwrite`, the mode of what they replace), set
before the rename so no reader ever sees a half-permissioned output.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from sdcompress.errors import SdcError

MANIFEST = ".sdcompress-output.json"
"""In every folder sdcompress publishes: the files it wrote there (what `--overwrite` may replace)."""

Kind = Literal["file", "dir"]
PathLike = str | os.PathLike[str]
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class Overwrite(enum.IntEnum):
    """What may happen to an existing output. `False`/`True` mean NEVER/OURS, so plain bools still work."""

    NEVER = 0  # an existing output is an error
    OURS = 1  # --overwrite: replace it when sdcompress wrote everything in it
    ANY = 2  # --overwrite-foreign: replace it whatever it holds


def overwrite_mode(overwrite: bool | Overwrite, foreign: bool = False) -> Overwrite:
    """The policy the `--overwrite` / `--overwrite-foreign` flags ask for (the stronger flag implies the other)."""
    return Overwrite.ANY if foreign else Overwrite(int(overwrite))


# ---------------------------------------------------------------------------- paths


def _real(p: Path) -> Path:
    """`p` with every symlink resolved (also for paths that do not exist yet); a loop is the user's to fix."""
    try:
        return p.resolve()
    except (RuntimeError, OSError):  # 3.11 raises RuntimeError on a symlink loop, later versions OSError
        raise SdcError(f"{p} is a symbolic link loop; remove the link or choose another path.") from None


def _existing_inputs(inputs: Iterable[PathLike | None]) -> list[Path]:
    """The inputs that are paths on disk (hub ids and built-in names are not, and cannot be written over)."""
    found = []
    for ref in inputs:
        if ref is None or str(ref) == "":
            continue
        p = Path(ref).expanduser()
        if os.path.lexists(p):
            found.append(p)
    return found


def check_inputs(output: Path, inputs: Iterable[PathLike | None]) -> None:
    """Refuse an output that is, contains, or lies inside an input: writing it would modify the input."""
    out = _real(output)
    for p in _existing_inputs(inputs):
        src = _real(p)
        if out == src:
            relation = "is"
        elif src in out.parents:
            relation = "lies inside"
        elif out in src.parents:
            relation = "contains"
        else:
            continue
        raise SdcError(
            f"the output {output} {relation} the input {p}; choose another output path "
            "(inputs are never modified)."
        )


# ---------------------------------------------------------------------------- ownership


def _entries(folder: Path) -> Iterator[str]:
    """Relative paths of every file and symlink under `folder` (symlinked folders are not followed)."""
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            yield (rel / name).as_posix()


def _manifest_files(folder: Path) -> set[str]:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return set()
    files = data.get("files") if isinstance(data, dict) else None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def foreign_files(folder: Path) -> list[str]:
    """Files in `folder` that its manifest does not list: what sdcompress did not write there."""
    listed = _manifest_files(folder)
    return sorted(f for f in _entries(folder) if f != MANIFEST and f not in listed)


def write_manifest(folder: Path) -> None:
    """Record every file now in `folder` as ours (called just before the folder is published)."""
    from sdcompress import __version__

    files = sorted(f for f in _entries(folder) if f != MANIFEST)
    data = {"written_by": f"sdcompress {__version__}", "files": files}
    (folder / MANIFEST).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _check_existing(p: Path, overwrite: Overwrite, kind: Kind | None) -> None:
    if not overwrite:
        raise SdcError(f"{p} already exists; choose another output path or pass --overwrite.")
    if p.is_symlink():  # replacing a link would either write through it or drop it: neither is asked for
        raise SdcError(f"{p} is a symbolic link; remove the link or give the path it points to.")
    is_dir = p.is_dir()
    if kind == "file" and is_dir:
        raise SdcError(
            f"{p} is a folder and this command writes a file there; remove it or choose another path."
        )
    if kind == "dir" and not is_dir:
        raise SdcError(
            f"{p} is a file and this command writes a folder there; remove it or choose another path."
        )
    if is_dir and overwrite < Overwrite.ANY:
        foreign = foreign_files(p)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise SdcError(
                f"{p} holds {len(foreign)} file(s) sdcompress did not write ({shown}); move them away, "
                "choose another output path, or pass --overwrite-foreign to replace the folder anyway."
            )


def check_output(
    path: PathLike,
    *,
    overwrite: bool | Overwrite = False,
    inputs: Iterable[PathLike | None] = (),
    kind: Kind | None = None,
) -> Path:
    """Fail early, before any work, when `path` cannot or must not be written.

    `inputs` are the job's input paths (names that are not paths are ignored);
    `kind` is what will be written there, a "file" or a "dir" (None: either).
    """
    p = Path(path).expanduser()
    _real(p)
    check_inputs(p, inputs)
    if os.path.lexists(p):
        _check_existing(p, Overwrite(int(overwrite)), kind)
    parent = p.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SdcError(
            f"cannot write to {parent}: the directory is not writable; choose another output path."
        )
    return p


# ---------------------------------------------------------------------------- space


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds (or will hold) `path`."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    p = Path(os.path.realpath(p))
    while not os.path.ismount(p):
        p = p.parent
    return p


def _human(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000:
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def check_space(path: PathLike, needed: int | None) -> None:
    """Refuse a write of `needed` bytes that cannot fit on the filesystem of `path` (before any work)."""
    if not needed:
        return
    mount = mount_point(Path(path))
    free = shutil.disk_usage(mount).free
    if free < needed:
        raise SdcError(
            f"not enough space on the filesystem mounted at {mount} for {path}: it needs {_human(needed)} "
            f"({needed} bytes) and {_human(free)} is free; free some space or choose another output path."
        )


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _DISK_FULL


class DiskFullError(SdcError):
    """The output's filesystem filled up; `needed` is the output's size when it was known."""

    def __init__(self, message: str, needed: int | None = None):
        super().__init__(message)
        self.needed = needed


def disk_full_error(path: PathLike, needed: int | None = None) -> DiskFullError:
    """The one sentence for ENOSPC/EDQUOT while writing `path` (the old output, if any, is untouched)."""
    mount = mount_point(Path(path))
    need = f"; it needs {_human(needed)} ({needed} bytes)" if needed else ""
    return DiskFullError(
        f"the filesystem mounted at {mount} ran out of space while writing {path}{need}; "
        "free some space or choose another output path.",
        needed,
    )


# ---------------------------------------------------------------------------- modes


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it to read it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_of(p: Path) -> int | None:
    try:
        st = p.lstat()
    except OSError:
        return None
    return None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)


def plain_mode(path: Path, umask: int, like: Path | None = None) -> int:
    """The mode `path` would have from open()/mkdir() under `umask`, or the mode of `like` it replaces."""
    old = _mode_of(like) if like is not None else None
    if old is not None and like is not None and like.is_dir() == path.is_dir():
        return old
    if path.is_dir():
        return 0o777 & ~umask
    executable = (_mode_of(path) or 0) & 0o111
    return (0o777 if executable else 0o666) & ~umask


def apply_umask(root: Path, like: Path | None = None) -> None:
    """Give `root` and everything under it (symlinks aside) the mode plain creation would give.

    `like` is the output `root` replaces: its mode, and the mode of each file at the same
    relative path in it, is kept (`--overwrite` keeps permissions the user chose).
    """
    umask = current_umask()
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                child = Path(dirpath) / name
                if child.is_symlink():
                    continue
                rel = child.relative_to(root)
                os.chmod(child, plain_mode(child, umask, like / rel if like is not None else None))
    if not root.is_symlink():
        os.chmod(root, plain_mode(root, umask, like))


# ---------------------------------------------------------------------------- writers


def _target(path: PathLike, overwrite: bool | Overwrite, kind: Kind, size: int | None) -> Path:
    target = check_output(path, overwrite=overwrite, kind=kind)
    check_space(target, size)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


@contextlib.contextmanager
def disk_full_as_error(target: Path, size: int | None = None) -> Iterator[None]:
    """ENOSPC/EDQUOT inside the block become `disk_full_error(target, size)`.

    A nested writer's error (a weight file inside a folder being written) is renamed to the
    outer output, the one the user named, keeping the size it knew when this one does not.
    """
    try:
        yield
    except DiskFullError as e:
        raise disk_full_error(target, size or e.needed) from None
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(target, size) from None
        raise


@contextlib.contextmanager
def atomic_file(
    path: PathLike, *, overwrite: bool | Overwrite = False, size: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` when the block succeeds.

    `size`, when known, is checked against the free space first and named if the disk fills.
    """
    target = _target(path, overwrite, "file", size)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        with disk_full_as_error(target, size):
            yield Path(tmp)
        apply_umask(Path(tmp), like=target if os.path.lexists(target) else None)
        check_output(target, overwrite=overwrite, kind="file")  # the state may have changed meanwhile
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(
    path: PathLike, *, overwrite: bool | Overwrite = False, size: int | None = None
) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; move it to `path` when the block succeeds.

    The folder gets its manifest and its final modes before the move; an old output is moved
    aside, and deleted only once the new one is in place.
    """
    target = _target(path, overwrite, "dir", size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        with disk_full_as_error(target, size):
            yield tmp
            write_manifest(tmp)
        exists = os.path.lexists(target)
        apply_umask(tmp, like=target if exists else None)
        old = None
        if exists:
            check_output(target, overwrite=overwrite, kind="dir")  # the state may have changed meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def replacing_dir(path: PathLike, *, overwrite: bool | Overwrite = False) -> Iterator[Path]:
    """Build a folder in place at `path`, with the old output moved aside until the new one is done.

    For jobs whose files record their own paths (the demo's run records name the student it
    distilled), so they cannot be built under a temporary name. The old output is restored if
    the block fails; a reader may see the new folder while it grows, never a mix of old and new.
    """
    target = _target(path, overwrite, "dir", None)
    old = None
    if os.path.lexists(target):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old.rmdir()
        os.replace(target, old)
    try:
        target.mkdir()
        with disk_full_as_error(target, None):
            yield target
            write_manifest(target)
        apply_umask(target, like=old)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
