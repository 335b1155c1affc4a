"""`sdcompress distill --teacher REF --student DIR --data IMAGES -o OUT`.

The options are generated from the training dataclasses (`cli/_training_options.py`);
this module adds the few that only distillation has and maps them to the service request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import typer

from sdcompress.cli import _training_options as T
from sdcompress.training import config as C


@dataclass(frozen=True)
class DistillOptions:
    teacher: tuple[str, ...] = field(
        default=(),
        metadata=C.option(
            "--teacher",
            "Teacher pipeline: folder, file, hub id or tiny-sd. Required; repeat it for teachers in "
            "succession (with --stage-steps).",
        ),
    )
    stage_steps: str | None = field(
        default=None,
        metadata=C.option(
            "--stage-steps",
            "Steps per --teacher, in order, e.g. 2000,1000 (a stage each; [[stages]] in --config can also "
            "prune between stages).",
            C.DISTILLATION,
        ),
    )
    student: str | None = field(
        default=None,
        metadata=C.option(
            "--student",
            "Student U-Net (e.g. a `prune` output). Required, except with --objective lcm or dmd2 "
            "(default: the teacher).",
        ),
    )
    features: C.FeatureMode = field(
        default=C.FeatureMode.BLOCKS,
        metadata=C.option(
            "--features", f"Feature taps: {', '.join(C.FeatureMode)}.", C.DISTILLATION, choices=C.FeatureMode
        ),
    )
    feature_norm: bool = field(
        default=False,
        metadata=C.option(
            "--feature-norm", "Divide each feature term by the teacher feature's scale.", C.DISTILLATION
        ),
    )

    def __post_init__(self) -> None:
        C.coerce_choices(self)


def _parse_stages(value, source: str):
    from sdcompress.services.stages import parse_stages

    return parse_stages(value, source)


def _stages(opts: DistillOptions, parsed: T.Parsed):
    """The stage plan: `[[stages]]` from the file, else the `--teacher A --teacher B --stage-steps` shorthand."""
    from sdcompress.errors import SdcError
    from sdcompress.services.stages import shorthand_stages

    planned = parsed.file.get("stages")
    if not planned and not opts.teacher:
        raise SdcError("--teacher is required; give it on the command line or in the --config file.")
    if planned and (opts.stage_steps or len(opts.teacher) > 1):
        raise SdcError(
            "give the stages once: [[stages]] in the --config file or --teacher with --stage-steps."
        )
    return planned or shorthand_stages(opts.teacher, opts.stage_steps)


def run(parsed: T.Parsed) -> None:
    from sdcompress.cli._output import emit_json, err, note, success
    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.services.stages import distill_stages

    opts, out = parsed[DistillOptions], parsed[T.OutputOptions]
    train, data, loss = parsed[C.TrainConfig], parsed[C.DataConfig], parsed[C.LossConfig]
    C.check_cache_latents(data, loss)
    stages = _stages(opts, parsed)
    request = DistillRequest(
        teacher=stages[0].teacher if stages else opts.teacher[0],
        student=opts.student,
        output=train.output_dir,
        data=data,
        train=train,
        features=opts.features,
        feature_norm=opts.feature_norm,
        weights=parsed[C.DistillWeights],
        loss=loss,
        save_dtype=out.dtype,
        allow_pickle=out.allow_pickle,
        consistency=parsed[C.ConsistencyConfig],
        dmd=parsed[C.DmdConfig],
        teacher_eval=parsed[C.TeacherEvalConfig],
    )
    with T.TrainingProgress(err, disable=out.json) as progress:
        result = distill_stages(request, stages, progress) if stages else distill(request, progress)
    if out.json:
        emit_json(result.__dict__ | {"feature_pairs": [fp.to_dict() for fp in result.feature_pairs]})
    else:
        T.loss_table(result)
    if result.interrupted:
        note(
            f"stopped at step {result.steps}; checkpoint {result.last_checkpoint}; rerun with --resume latest"
        )
        raise typer.Exit(130)
    if not out.json:
        pairs = f", {len(result.feature_pairs)} feature pairs" if result.feature_pairs else ""
        success(f"wrote {result.output} ({result.steps} steps{pairs})")


distill = T.training_command(
    T.TrainingCommand(
        name="distill",
        sections=(
            DistillOptions,
            C.ConsistencyConfig,
            C.DmdConfig,
            C.DistillWeights,
            C.TeacherEvalConfig,
            C.DataConfig,
            C.LossConfig,
            C.TrainConfig,
            T.OutputOptions,
        ),
        panels=(None, C.DATA, C.DISTILLATION, C.OPTIMISATION, C.LOSS, C.RUN),
        run=run,
        file_keys={"stages": _parse_stages},
        required=("output",),
        defaults={"lr": 5e-5},
        helps={"output": "Folder for the distilled pipeline. Required."},
        doc="""Distill a pruned student U-Net from its teacher (task + output + feature losses, BK-SDM style).

    --objective lcm trains a few-step student instead (latent consistency distillation; --lora RANK
    for an LCM-LoRA in kohya layout). --objective dmd2 trains one by distribution matching (DMD2:
    --student-steps, --teacher-guidance, --fake-lora, --fake-updates, --gan-weight). A step-distilled
    teacher: --timesteps trailing:4 (with dmd2: its base model as --teacher, it as --student).

    Checkpoints go to OUTPUT.train/ (or --work-dir); rerun with --resume latest after a stop.
    Multi-GPU: `accelerate launch -m sdcompress distill ...` with the same options.
    """,
    )
)
