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
    teacher: str | None = field(
        default=None,
        metadata=C.option("--teacher", "Teacher pipeline: folder, file, hub id or tiny-sd. Required."),
    )
    student: str | None = field(
        default=None,
        metadata=C.option(
            "--student",
            "Student U-Net (e.g. a `prune` output). Required, except with --objective lcm (default: the teacher).",
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


def run(parsed: T.Parsed) -> None:
    from sdcompress.cli._output import emit_json, err, note, success
    from sdcompress.services.distill import DistillRequest, distill

    opts, out = parsed[DistillOptions], parsed[T.OutputOptions]
    train, data, loss = parsed[C.TrainConfig], parsed[C.DataConfig], parsed[C.LossConfig]
    C.check_cache_latents(data, loss)
    request = DistillRequest(
        teacher=opts.teacher,
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
    )
    with T.TrainingProgress(err, disable=out.json) as progress:
        result = distill(request, progress)
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
            C.DistillWeights,
            C.DataConfig,
            C.LossConfig,
            C.TrainConfig,
            T.OutputOptions,
        ),
        panels=(None, C.DATA, C.DISTILLATION, C.OPTIMISATION, C.LOSS, C.RUN),
        run=run,
        required=("teacher", "output"),
        defaults={"lr": 5e-5},
        helps={"output": "Folder for the distilled pipeline. Required."},
        doc="""Distill a pruned student U-Net from its teacher (task + output + feature losses, BK-SDM style).

    --objective lcm trains a few-step student instead (latent consistency distillation; --lora RANK
    for an LCM-LoRA in kohya layout). A step-distilled teacher: --timesteps trailing:4.

    Checkpoints go to OUTPUT.train/ (or --work-dir); rerun with --resume latest after a stop.
    Multi-GPU: `accelerate launch -m sdcompress distill ...` with the same options.
    """,
    )
)
