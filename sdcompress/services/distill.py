"""`distill`: teach a pruned student U-Net to imitate its teacher, on the shared training engine.

The teacher is loaded once as a whole pipeline (its VAE, text encoders and
scheduler serve both models); the student U-Net comes from the student folder
with its own, true config. The output is the teacher's pipeline with the
student U-Net in place, written by the project's diffusers writer so plain
`from_pretrained` loads it, plus `sdcompress_run.json`: the record `push`
turns into a model card.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdcompress import __version__
from sdcompress.checkpoint.atomic import check_output
from sdcompress.errors import SdcError
from sdcompress.training.data import DataConfig, model_bucket_step
from sdcompress.training.distill_task import DistillTask, DistillWeights
from sdcompress.training.engine import ProgressCallback, TrainConfig, TrainResult, train
from sdcompress.training.features import FeaturePair, check_compatible, pair_features
from sdcompress.training.task import DiffusionParts, LossConfig, TrainingSummary

RUN_RECORD = "sdcompress_run.json"
MAX_CURVE_POINTS = 500


@dataclass(frozen=True)
class DistillRequest:
    """A distillation run: who teaches whom, on what data, with which training settings."""

    teacher: str
    student: str
    output: Path
    data: DataConfig
    train: TrainConfig
    features: str = "blocks"
    feature_norm: bool = False
    weights: DistillWeights = DistillWeights()
    loss: LossConfig = LossConfig()
    save_dtype: str | None = None
    allow_pickle: bool = False


@dataclass
class DistillResult:
    output: Path | None
    work_dir: Path
    steps: int
    max_steps: int
    interrupted: bool
    resumed_from: Path | None
    last_checkpoint: Path | None
    feature_pairs: list[FeaturePair]
    first_losses: dict[str, float]
    last_losses: dict[str, float]
    data: dict[str, Any]
    seconds: float
    validation_images: list[Path] = field(default_factory=list)


def default_work_dir(output: Path) -> Path:
    """Checkpoints, validation grids and logs live beside the output, so the output itself stays atomic."""
    return output.with_name(output.name + ".train")


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
    request: DistillRequest, teacher, student_config: dict, pairs, summary: TrainingSummary
) -> dict:
    """Everything `push` needs for a model card: provenance, recipe, data and the loss curve."""
    from sdcompress.arch.count import count_unet_config
    from sdcompress.arch.presets import match_preset

    return {
        "tool": "sdcompress",
        "version": __version__,
        "command": "distill",
        "teacher": request.teacher,
        "teacher_family": teacher.family.name,
        "student": request.student,
        "preset": match_preset(student_config, teacher.family),
        "student_unet_parameters": count_unet_config(student_config),
        "teacher_unet_parameters": count_unet_config(teacher.configs["unet"]),
        "steps": summary.steps,
        "epoch": summary.epoch,
        "loss_weights": asdict(request.weights),
        "features": request.features,
        "feature_norm": request.feature_norm,
        "feature_pairs": [p.to_dict() for p in pairs],
        "snr_gamma": request.loss.snr_gamma,
        "noise_offset": request.loss.noise.offset,
        "options": summary.options,
        "data": summary.data,
        "loss_curve": loss_curve(summary.loss_history),
    }


def _save_dtype(request: DistillRequest, teacher) -> torch.dtype | None:
    from sdcompress.choices import resolve_dtype

    if request.save_dtype:
        return resolve_dtype(request.save_dtype)
    first = next(iter(teacher.components["unet"].values()), None)
    return None if first is None else first.dtype


def _load(request: DistillRequest):
    """Teacher and student headers, checked against each other before anything big is built."""
    from sdcompress.checkpoint.resolve import load_model

    teacher = load_model(request.teacher, allow_pickle=request.allow_pickle)
    if teacher.unet_only:
        raise SdcError(
            f"the teacher {request.teacher} is a lone U-Net; give a whole pipeline (its VAE and text "
            "encoders are needed) as --teacher."
        )
    student = load_model(request.student, allow_pickle=request.allow_pickle)
    check_compatible(student.configs["unet"], teacher.configs["unet"], request.teacher)
    return teacher, student


def distill(request: DistillRequest, progress: ProgressCallback | None = None) -> DistillResult:
    """Run (or resume) a distillation and write the distilled pipeline."""
    from sdcompress.checkpoint.instantiate import build_module, build_pipeline
    from sdcompress.checkpoint.tensors import lazy_state_dict
    from sdcompress.checkpoint.writers import save_diffusers

    inputs = [request.teacher, request.student, request.data.data_dir, request.train.work_dir]
    output = check_output(request.output, overwrite=request.train.overwrite, inputs=inputs, kind="dir")
    request.train.validate()
    teacher, student = _load(request)
    data = replace(
        request.data,
        resolution=request.data.resolution or teacher.family.resolution,
        bucket_step=model_bucket_step(teacher.configs["vae"], student.configs["unet"]),
    )
    data.validate()
    if data.resolution % data.bucket_step:
        raise SdcError(
            f"--resolution {data.resolution} does not fit this model; use a multiple of {data.bucket_step}."
        )
    pipe = build_pipeline(teacher, dtype=torch.float32)
    student_unet = build_module(student, "unet", dtype=torch.float32)
    pairs = pair_features(student_unet, pipe.unet, request.features, request.teacher)
    parts = DiffusionParts.from_pipeline(pipe)
    teacher_unet, parts.unet = parts.unet, student_unet
    save_dtype = _save_dtype(request, teacher)

    def save(unet: torch.nn.Module, out: Path, summary: TrainingSummary) -> None:
        weights = lazy_state_dict({k: v.detach().cpu() for k, v in unet.state_dict().items()})
        model = teacher.with_unet(weights, dict(student.configs["unet"]))
        record = run_record(request, teacher, student.configs["unet"], pairs, summary)
        extra = {RUN_RECORD: json.dumps(record, indent=2, default=str) + "\n"}
        save_diffusers(model, out, dtype=save_dtype, overwrite=True, extra_files=extra)

    task = DistillTask(
        parts,
        teacher_unet,
        pairs,
        weights=request.weights,
        loss=request.loss,
        feature_norm=request.feature_norm,
        saver=save,
    )
    config = replace(request.train, output_dir=output)
    try:
        result: TrainResult = train(task, config, data, progress)
    finally:
        task.close()
    history = result.loss_history
    terms = lambda entry: {k: v for k, v in entry.items() if k not in ("step", "lr")}  # noqa: E731
    return DistillResult(
        output=result.output_dir,
        work_dir=config.work_dir,
        steps=result.steps,
        max_steps=result.max_steps,
        interrupted=result.interrupted,
        resumed_from=result.resumed_from,
        last_checkpoint=result.last_checkpoint,
        feature_pairs=pairs,
        first_losses=terms(history[0]) if history else {},
        last_losses=terms(history[-1]) if history else {},
        data=result.data.to_dict(),
        seconds=result.seconds,
        validation_images=result.validation_images,
    )
