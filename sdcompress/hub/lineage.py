"""What sdcompress knows about where a model came from, read back from the records it leaves.

`prune` writes `sdcompress_prune.json` into its output folder (teacher, preset
or removed blocks, parameter counts before and after) and the training
commands write `sdcompress_run.json` (teacher, steps, options, loss curve). A
single `.safetensors` file carries the same records as JSON strings in its
metadata under `sdcompress.prune` / `sdcompress.run`. Every record is
optional and read leniently: a model card with less lineage is better than a
push that fails because a record is missing, old or hand-edited.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcompress import __version__

if TYPE_CHECKING:
    from sdcompress.training.task import TrainingSummary

PRUNE_RECORD = "sdcompress_prune.json"
RUN_RECORD = "sdcompress_run.json"
MAX_CURVE_POINTS = 500
METADATA_KEYS = {"prune": "sdcompress.prune", "run": "sdcompress.run"}

# Where a sample grid may sit in a model folder, most specific first; the
# training loop saves its validation grids as validation/step-NNNNNNNN.png.
GRID_NAMES = ("sample_grid.png", "samples.png", "grid.png")
GRID_FOLDERS = ("validation", "samples")


def loss_curve(history: list[dict[str, float]], points: int = MAX_CURVE_POINTS) -> list[dict[str, float]]:
    """At most `points` evenly spaced entries of the history, always keeping the last step."""
    if len(history) <= points:
        return list(history)
    stride = len(history) / points
    picked = [history[int(i * stride)] for i in range(points)]
    if picked[-1] is not history[-1]:
        picked[-1] = history[-1]
    return picked


def run_record(
    command: str, *, family: str, preset: str | None, summary: TrainingSummary, **fields: Any
) -> dict[str, Any]:
    """The one schema of `sdcompress_run.json`, written by every training command.

    Provenance and the training summary are the same keys for all commands;
    `fields` are the command's own (`teacher` and `student` for distill,
    `base_model` for finetune and lora train, adapter settings...). `push`
    reads the record back into a model card (`Lineage`).
    """
    return {
        "tool": "sdcompress",
        "version": __version__,
        "command": command,
        "family": family,
        "preset": preset,
        **fields,
        "steps": summary.steps,
        "epoch": summary.epoch,
        "options": summary.options,
        "data": summary.data,
        "loss_curve": loss_curve(summary.loss_history),
    }


def run_record_file(record: dict[str, Any]) -> dict[str, str]:
    """The record as an extra file for the writers (`extra_files=`), published with the output."""
    return {RUN_RECORD: json.dumps(record, indent=2, default=str) + "\n"}


def write_run_record(folder: Path, record: dict[str, Any]) -> None:
    """Write the record into an output folder being filled (for outputs no model writer saves)."""
    for name, text in run_record_file(record).items():
        (folder / name).write_text(text, encoding="utf-8")


@dataclass
class Lineage:
    prune: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    sample_grid: str | None = None  # posix path relative to the uploaded folder
    notes: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None  # `sdcompress eval`'s eval.json found beside the model

    @property
    def teacher(self) -> str | None:
        """The model this one came from: the distillation teacher, else the fine-tuned base, else the pruned teacher."""
        for record, key in ((self.run, "teacher"), (self.run, "base_model"), (self.prune, "teacher")):
            if record and isinstance(record.get(key), str):
                return record[key]
        return None

    @property
    def run_kind(self) -> str | None:
        """distill, finetune or lora: the command that wrote the training record ("lora train" -> lora)."""
        if not self.run:
            return None
        kind = self.run.get("command") or self.run.get("kind") or self.run.get("task")
        return str(kind).split()[0] if kind else None

    def loss_curve(self) -> list[dict[str, float]]:
        return loss_entries(self.run) if self.run else []


def loss_entries(run: dict[str, Any]) -> list[dict[str, float]]:
    """`{"step", "loss", ...terms}` entries from `loss_curve` (or `loss_history`), read leniently:
    plain numbers and [step, loss] pairs are accepted too; entries without a numeric loss are skipped."""
    raw = run.get("loss_curve", run.get("loss_history"))
    if not isinstance(raw, list):
        return []
    entries = []
    for i, item in enumerate(raw, start=1):
        if isinstance(item, int | float) and not isinstance(item, bool):
            item = {"step": i, "loss": item}
        elif isinstance(item, list | tuple) and len(item) == 2:
            item = {"step": item[0], "loss": item[1]}
        if not isinstance(item, dict) or not isinstance(item.get("loss"), int | float):
            continue
        step = item.get("step", i)
        terms = {k: float(v) for k, v in item.items() if isinstance(v, int | float) and k != "step"}
        entries.append({"step": int(step) if isinstance(step, int | float) else i, **terms})
    return entries


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{path.name} could not be read ({e.__class__.__name__}); the card leaves it out.")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object; the card leaves it out.")
        return None
    return data


def _parse_metadata_record(raw: str | None, key: str, notes: list[str]) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        notes.append(f"metadata {key} is not JSON; the card leaves it out.")
        return None
    return data if isinstance(data, dict) else None


def find_sample_grid(folder: Path) -> str | None:
    """The folder's sample grid: a well-known name, else the newest validation grid."""
    for name in GRID_NAMES:
        if (folder / name).is_file():
            return name
    for sub in GRID_FOLDERS:
        images = sorted((folder / sub).glob("*.png")) if (folder / sub).is_dir() else []
        if images:
            return images[-1].relative_to(folder).as_posix()
    return None


EVAL_SUFFIX = ".eval"  # `sdcompress eval MODEL` writes MODEL.eval/ by default
EVAL_RESULT = "eval.json"


def eval_beside(path: Path, notes: list[str]) -> dict[str, Any] | None:
    """The eval result that sits beside a model: MODEL.eval/eval.json, else MODEL/eval.json."""
    for candidate in (path.with_name(path.name + EVAL_SUFFIX) / EVAL_RESULT, path / EVAL_RESULT):
        if candidate.is_file():
            data = _read_json(candidate, notes)
            if data is not None and isinstance(data.get("models"), list):
                return data
            notes.append(f"{candidate} is not an `sdcompress eval` result; the card leaves it out.")
    return None


def folder_lineage(folder: Path) -> Lineage:
    notes: list[str] = []
    return Lineage(
        prune=_read_json(folder / PRUNE_RECORD, notes),
        run=_read_json(folder / RUN_RECORD, notes),
        sample_grid=find_sample_grid(folder),
        notes=notes,
    )


def file_lineage(metadata: dict[str, str]) -> Lineage:
    notes: list[str] = []
    return Lineage(
        prune=_parse_metadata_record(metadata.get(METADATA_KEYS["prune"]), METADATA_KEYS["prune"], notes),
        run=_parse_metadata_record(metadata.get(METADATA_KEYS["run"]), METADATA_KEYS["run"], notes),
        notes=notes,
    )
