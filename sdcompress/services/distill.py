"""`distill`: teach a pruned student U-Net to imitate its teacher, on the shared training engine.

The teacher is loaded once as a whole pipeline (its VAE, text encoders and
scheduler serve both models); the student U-Net comes from the student folder
with its own, true config. The output is the teacher's pipeline with the
student U-Net in place, written by the project's diffusers writer so plain
`from_pretrained` loads it, plus `sdcompress_run.json`: the record `push`
turns into a model card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from sdcompress.checkpoint.atomic import check_output
from sdcompress.errors import SdcError
from sdcompress.hub.lineage import run_record as lineage_record
from sdcompress.hub.lineage import run_record_file
from sdcompress.services.finetune import TrainingRunResult, fit_data, run_training, save_dtype
from sdcompress.training.config import ConsistencyConfig, DmdConfig, TeacherEvalConfig
from sdcompress.training.data import DataConfig
from sdcompress.training.distill_task import DistillTask, DistillWeights
from sdcompress.training.engine import ProgressCallback, TrainConfig
from sdcompress.training.features import FeaturePair, check_compatible, pair_features
from sdcompress.training.task import DiffusionParts, LossConfig, TrainingSummary


@dataclass(frozen=True)
class DistillRequest:
    """A distillation run: who teaches whom, on what data, with which training settings."""

    teacher: str
    student: str | None  # None: the teacher itself (only with --objective lcm or dmd2)
    output: Path
    data: DataConfig
    train: TrainConfig
    features: str = "blocks"
    feature_norm: bool = False
    weights: DistillWeights = DistillWeights()
    loss: LossConfig = LossConfig()
    save_dtype: str | None = None
    allow_pickle: bool = False
    consistency: ConsistencyConfig = ConsistencyConfig()
    dmd: DmdConfig = DmdConfig()
    teacher_eval: TeacherEvalConfig = TeacherEvalConfig()  # --eval-every: agreement during training
    stages: tuple[dict, ...] = ()  # a staged run's record so far, this stage last (services.stages)


@dataclass
class DistillResult(TrainingRunResult):
    """How a distillation ended: the shared training result plus the feature pairs it matched."""

    feature_pairs: list[FeaturePair] = field(default_factory=list)


def default_work_dir(output: Path) -> Path:
    """Checkpoints, validation grids and logs live beside the output, so the output itself stays atomic."""
    return output.with_name(output.name + ".train")


def run_record(
    request: DistillRequest, teacher, student_config: dict, pairs, summary: TrainingSummary
) -> dict:
    """Everything `push` needs for a model card: provenance, recipe, data and the loss curve."""
    from sdcompress.arch.count import count_unet_config
    from sdcompress.arch.presets import match_preset

    return lineage_record(
        "distill",
        family=teacher.family.name,
        preset=match_preset(student_config, teacher.family),
        summary=summary,
        teacher=request.teacher,
        student=request.student,
        student_unet_parameters=count_unet_config(student_config),
        teacher_unet_parameters=count_unet_config(teacher.configs["unet"]),
        loss_weights=asdict(request.weights),
        features=request.features,
        feature_norm=request.feature_norm,
        feature_pairs=[p.to_dict() for p in pairs],
        snr_gamma=request.loss.snr_gamma,
        noise_offset=request.loss.noise.offset,
        prediction_type=student_prediction(request, teacher),
        teacher_prediction_type=teacher.prediction_type,
        timesteps=request.loss.noise.timesteps,
        **({"stages": list(request.stages)} if request.stages else {}),
    )


def student_prediction(request: DistillRequest, teacher) -> str:
    """What the student learns to predict: --prediction-type, else what the teacher predicts."""
    return str(request.loss.noise.prediction_type or teacher.prediction_type)


def student_scheduler_config(request: DistillRequest, teacher) -> dict:
    """The teacher's scheduler settings with what inference with the student needs.

    Its prediction type, and with `--timesteps trailing:4`-style training the spacing the student was
    trained for (SDXL-Lightning and KOALA-Lightning are sampled with `timestep_spacing="trailing"`).
    """
    from sdcompress.training.noise import timestep_spacing

    config = dict(teacher.configs["scheduler"])
    config["prediction_type"] = student_prediction(request, teacher)
    spacing = timestep_spacing(request.loss.noise.timesteps)
    if spacing is not None:
        config["timestep_spacing"] = spacing
    return config


def default_validation_steps(train: TrainConfig, steps: int | None) -> TrainConfig:
    """Validation images at the step count the student is for (a step-distilled teacher's, LCM's few),
    unless --validation-steps was given."""
    if steps is None or train.validation.steps != type(train.validation)().steps:
        return train
    return replace(train, validation=replace(train.validation, steps=steps))


def _few_step_objective(request: DistillRequest):
    """The task factory and training-config rule of `--objective lcm` or `dmd2` (same signatures)."""
    if request.consistency.is_lcm:
        from sdcompress.services.consistency import lcm_task, lcm_train_config

        return lcm_task, lcm_train_config
    from sdcompress.services.dmd import dmd2_task, dmd2_train_config

    return dmd2_task, dmd2_train_config


def _load(request: DistillRequest):
    """Teacher and student headers, checked against each other before anything big is built."""
    from sdcompress.checkpoint.resolve import load_model

    teacher = load_model(request.teacher, allow_pickle=request.allow_pickle)
    if teacher.unet_only:
        raise SdcError(
            f"the teacher {request.teacher} is a lone U-Net; give a whole pipeline (its VAE and text "
            "encoders are needed) as --teacher."
        )
    if request.student is None and not request.consistency.few_step:
        raise SdcError("--student is required; give the pruned student to distill (a `prune` output).")
    student = load_model(request.student or request.teacher, allow_pickle=request.allow_pickle)
    check_compatible(student.configs["unet"], teacher.configs["unet"], request.teacher)
    return teacher, student


def distill(request: DistillRequest, progress: ProgressCallback | None = None) -> DistillResult:
    """Run (or resume) a distillation and write the distilled pipeline."""
    from sdcompress.checkpoint.instantiate import build_module, build_pipeline
    from sdcompress.checkpoint.tensors import lazy_state_dict
    from sdcompress.checkpoint.writers import save_diffusers

    inputs = [request.teacher, request.student, request.data.data_dir, request.train.work_dir]
    output = check_output(request.output, overwrite=request.train.overwrite_policy, inputs=inputs, kind="dir")
    request.train.validate()
    request.consistency.validate()
    request.dmd.validate(request.consistency.objective)
    if request.consistency.is_dmd2:
        from sdcompress.services.dmd import check_request

        check_request(request)
    request.teacher_eval.validate()
    if request.teacher_eval.every and (request.consistency.is_lcm or request.consistency.is_dmd2):
        raise SdcError(
            "--eval-every compares a student that imitates its teacher step for step; drop it with "
            "--objective lcm or dmd2 (score the result with `sdcompress eval` instead)."
        )
    teacher, student = _load(request)
    data = fit_data(request.data, teacher, student.configs["unet"])
    pipe = build_pipeline(teacher, dtype=torch.float32)
    student_unet = build_module(student, "unet", dtype=torch.float32)
    parts = DiffusionParts.from_pipeline(pipe)
    teacher_unet, parts.unet = parts.unet, student_unet
    if request.consistency.is_lcm or request.consistency.is_dmd2:  # few-step students: their own task
        make_task, train_config = _few_step_objective(request)
        task = make_task(
            request,
            teacher,
            student,
            parts,
            teacher_unet,
            save_dtype(request.save_dtype, teacher),
            data.resolution,
        )
        train = train_config(replace(request.train, output_dir=output), task)
        try:
            return DistillResult(**vars(run_training(task, train, data, progress)))
        finally:
            task.close()
    pairs = pair_features(student_unet, pipe.unet, request.features, request.teacher)
    scheduler_config = student_scheduler_config(request, teacher)
    scheduler = parts.extra_components["scheduler"]  # validation samples as the student will be sampled
    parts.extra_components["scheduler"] = type(scheduler).from_config(
        {**scheduler.config, **scheduler_config}
    )
    dtype = save_dtype(request.save_dtype, teacher)

    def save(unet: torch.nn.Module, out: Path, summary: TrainingSummary) -> None:
        weights = lazy_state_dict({k: v.detach().cpu() for k, v in unet.state_dict().items()})
        model = teacher.with_unet(weights, dict(student.configs["unet"]))
        model.configs["scheduler"] = scheduler_config
        record = run_record(request, teacher, student.configs["unet"], pairs, summary)
        save_diffusers(model, out, dtype=dtype, overwrite=True, extra_files=run_record_file(record))

    task = DistillTask(
        parts,
        teacher_unet,
        pairs,
        weights=request.weights,
        loss=request.loss,
        feature_norm=request.feature_norm,
        saver=save,
        teacher_prediction=teacher.prediction_type,
    )
    if request.teacher_eval.every:
        from sdcompress.evaluation.probe import TeacherAgreementProbe

        task.probe = TeacherAgreementProbe(parts, teacher_unet, request.teacher_eval, data.resolution)
    allowed = task.allowed_timesteps
    train = default_validation_steps(
        replace(request.train, output_dir=output), None if allowed is None else len(allowed)
    )
    try:
        result = run_training(task, train, data, progress)
    finally:
        task.close()
    return DistillResult(**vars(result), feature_pairs=pairs)
