"""Training checkpoints on disk: naming, completeness, rotation, and finding the one to resume.

A checkpoint is `checkpoint-<step>/` holding accelerate's `save_state` output
(model, optimizer, lr scheduler, EMA, RNG of every rank) and, written last,
`trainer_state.json`. A folder without that file is an interrupted save and is
never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sdcompress.errors import SdcError

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: read_state(p)["step"])


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write the marker last and atomically: its presence means the checkpoint is whole."""
    tmp = path / f".{STATE_FILE}.partial"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path / STATE_FILE)


def rotate(root: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`, and stale incomplete ones; returns what went."""
    complete = list_checkpoints(root)
    removed = []
    if keep is not None and keep > 0 and len(complete) > keep:
        for path in complete[: len(complete) - keep]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    newest = complete[-1].name if complete else None
    for path in root.iterdir() if root.is_dir() else []:
        if (
            path.is_dir()
            and path.name.startswith(PREFIX)
            and not is_complete(path)
            and newest
            and path.name < newest
        ):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """The checkpoint to resume: `latest` (None when there is none yet, so scripts can always pass it) or a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise SdcError(f"checkpoint {path} does not exist; pass --resume latest or a checkpoint-N folder.")
    if not is_complete(path):
        raise SdcError(f"{path} is not a complete checkpoint (no {STATE_FILE}); resume from an earlier one.")
    return path
