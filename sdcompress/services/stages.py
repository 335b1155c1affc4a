"""Distillation in stages: several teachers in succession, the student optionally pruned between them.

SSD-1B was distilled from SDXL, then ZavyChromaXL, then JuggernautXL, its U-Net made shorter on the way.
A plan is a list of `Stage`s (from `[[stages]]` in `distill --config run.toml`, or the shorthand
`--teacher A --teacher B --stage-steps 2000,1000`); each stage is one ordinary `distill` run on the one
training loop, whose student is the previous stage's output (pruned first when the stage says so).

Everything a stage makes lives under the run's work folder (`OUTPUT.train/stage-N/`: the pruned student,
the stage's checkpoints, its distilled student), and only the last stage writes OUTPUT. A stage's output
is written atomically, so after a stop `--resume latest` skips the stages that finished and resumes the
one that did not from its last checkpoint: the same bytes as an uninterrupted run. Intermediate students
are kept in fp32 so the next stage starts from exactly what training produced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdcompress.errors import SdcError
from sdcompress.services.distill import DistillRequest, DistillResult, distill
from sdcompress.training.engine import ProgressCallback

STAGE_KEYS = ("teacher", "steps", "lr", "prune")
NOT_PRUNE_KEYS = {"teacher", "output", "unet_only", "overwrite", "allow_pickle", "evaluate"}


@dataclass(frozen=True)
class Stage:
    """One stage: its teacher, its optimizer steps, its learning rate (default: --lr), a prune before it.

    `prune` holds `prune` options by flag name (`drop-transformer-blocks = 2`, `mid-block = "remove"`,
    `preset`, `select`, ...); they are applied to the student this stage starts from.
    """

    teacher: str
    steps: int
    lr: float | None = None
    prune: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _prune_fields() -> set[str]:
    from sdcompress.services.prune import PruneRequest

    return {f.name for f in dataclasses.fields(PruneRequest)} - NOT_PRUNE_KEYS


def parse_stages(value: Any, source: str) -> tuple[Stage, ...]:
    """`[[stages]]` tables from a config file as `Stage`s; anything malformed is one sentence naming it."""
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise SdcError(f"{source}: 'stages' must be a list of tables ([[stages]] with teacher and steps).")
    stages = []
    allowed_prune = _prune_fields()
    for number, table in enumerate(value, 1):
        unknown = sorted(set(table) - set(STAGE_KEYS))
        if unknown:
            raise SdcError(
                f"{source}: stage {number} has unknown keys {unknown}; a stage takes {', '.join(STAGE_KEYS)}."
            )
        teacher, steps = table.get("teacher"), table.get("steps")
        if not isinstance(teacher, str) or not teacher:
            raise SdcError(f"{source}: stage {number} needs a teacher (a model reference).")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise SdcError(f"{source}: stage {number} needs steps, a positive integer.")
        lr = table.get("lr")
        if lr is not None and (not isinstance(lr, int | float) or lr <= 0):
            raise SdcError(f"{source}: stage {number} has a bad lr {lr!r}; give a positive number.")
        prune = table.get("prune")
        if prune is not None:
            if not isinstance(prune, dict):
                raise SdcError(f"{source}: stage {number}'s prune must be a table of prune options.")
            prune = {k.replace("-", "_"): v for k, v in prune.items()}
            bad = sorted(set(prune) - allowed_prune)
            if bad:
                raise SdcError(
                    f"{source}: stage {number}'s prune has unknown options {bad}; "
                    f"use prune's options: {', '.join(sorted(k.replace('_', '-') for k in allowed_prune))}."
                )
        stages.append(Stage(teacher, steps, None if lr is None else float(lr), prune))
    return tuple(stages)


def shorthand_stages(teachers: tuple[str, ...], stage_steps: str | None) -> tuple[Stage, ...]:
    """`--teacher A --teacher B --stage-steps 2000,1000`: one stage per teacher, no pruning between."""
    if stage_steps is None:
        if len(teachers) > 1:
            raise SdcError(
                "several --teacher options need --stage-steps with one step count per teacher, e.g. 2000,1000."
            )
        return ()
    try:
        steps = [int(s) for s in stage_steps.replace(" ", "").split(",") if s]
    except ValueError:
        raise SdcError(
            f"--stage-steps {stage_steps!r} must be step counts separated by commas, e.g. 2000,1000."
        ) from None
    if len(steps) != len(teachers) or min(steps, default=0) < 1:
        raise SdcError(
            f"--stage-steps has {len(steps)} positive counts for {len(teachers)} --teacher options; give one per teacher."
        )
    return tuple(Stage(t, s) for t, s in zip(teachers, steps, strict=True))


def student_layout(ref: str, allow_pickle: bool) -> dict[str, Any]:
    """The student a stage trained, as the run record shows it: preset, layout, size."""
    from sdcompress.arch.count import count_unet_config
    from sdcompress.checkpoint.resolve import load_model

    model = load_model(ref, allow_pickle=allow_pickle)
    layout = model.unet_layout
    return {
        "preset": model.preset,
        "unet_parameters": count_unet_config(model.configs["unet"]),
        "transformer_blocks": layout.transformer_blocks(),
        "down": [list(level) for level in layout.down],
        "mid": layout.mid,
        "up": [list(level) for level in layout.up],
    }


def _prune_student(stage: Stage, student: str, folder: Path, request: DistillRequest, resume: bool) -> str:
    from sdcompress.services.prune import PruneRequest, prune

    if resume and folder.is_dir():
        return str(folder)  # written atomically: a folder there is a finished prune
    options = {"seed": request.train.seed, **(stage.prune or {})}
    try:
        prune_request = PruneRequest(
            teacher=student,
            output=str(folder),
            unet_only=True,
            overwrite=True,
            allow_pickle=request.allow_pickle,
            **options,
        )
    except TypeError as exc:
        raise SdcError(
            f"a stage's prune options do not fit prune ({exc}); check them against `sdcompress prune --help`."
        ) from exc
    prune(prune_request)
    return str(folder)


@dataclass
class StagedResult(DistillResult):
    """The last stage's result, with every stage's record (and where a stop happened)."""

    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stage: int = 0  # the stage that ran last (1-based)


def distill_stages(
    request: DistillRequest, stages: tuple[Stage, ...], progress: ProgressCallback | None = None
) -> StagedResult:
    """Run the plan; `request` gives the first student, the data, the output and the shared options."""
    from sdcompress.checkpoint.atomic import check_output

    if not stages:
        raise SdcError("a staged distillation needs at least one stage.")
    if request.student is None:
        raise SdcError("--student is required; give the student the first stage starts from.")
    check_output(
        request.output, overwrite=request.train.overwrite_policy, inputs=[request.student], kind="dir"
    )
    work = request.train.work_dir
    resume = request.train.resume is not None
    student, records = request.student, []
    result: DistillResult | None = None
    for number, stage in enumerate(stages, 1):
        folder = work / f"stage-{number}"
        last = number == len(stages)
        if stage.prune:
            student = _prune_student(stage, student, folder / "pruned", request, resume)
        out = request.output if last else folder / "student"
        record = {"stage": number, **stage.to_dict(), "student_from": student}
        record["student_layout"] = student_layout(student, request.allow_pickle)
        if last or not (resume and out.is_dir()):
            train = replace(
                request.train,
                work_dir=folder / "train",
                max_steps=stage.steps,
                epochs=None,
                lr=stage.lr or request.train.lr,
                resume="latest" if resume else None,
                overwrite=request.train.overwrite or not last,
            )
            stage_request = replace(
                request,
                teacher=stage.teacher,
                student=student,
                output=out,
                train=train,
                save_dtype=request.save_dtype if last else "fp32",
                stages=(*records, record),
            )
            result = distill(stage_request, progress)
            if result.interrupted:
                return StagedResult(**vars(result), stages=[*records, record], stage=number)
        records.append(record)
        student = str(out)
    assert result is not None
    return StagedResult(**vars(result), stages=records, stage=len(stages))
