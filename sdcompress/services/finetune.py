"""`finetune`: full fine-tuning of a pipeline's U-Net (and optionally its text encoders) on the shared engine.

Works on any model `load_model` reads, pruned students included: the U-Net is
built from its own config. The output is the pipeline with the trained weights
(the EMA weights when EMA is on: the engine swaps them in before saving),
written by the project's diffusers writer, plus `sdcompress_run.json`; with
`save_single_file` also `OUT/model.safetensors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdcompress.arch.families import Config
from sdcompress.checkpoint.atomic import check_output
from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import StateDict, lazy_state_dict
from sdcompress.errors import SdcError
from sdcompress.hub.lineage import run_record, run_record_file
from sdcompress.training.data import DataConfig, model_bucket_step
from sdcompress.training.engine import ProgressCallback, TrainConfig, TrainResult, train
from sdcompress.training.finetune_task import (
    FinetuneTask,
    PriorPreservation,
    UNetTrainingTask,
    module_weights,
)
from sdcompress.training.task import DiffusionParts, LossConfig, TrainingSummary

SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class FinetuneRequest:
    model: str
    output: Path
    data: DataConfig
    train: TrainConfig
    loss: LossConfig = LossConfig()
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    save_single_file: bool = False
    save_dtype: str | None = None
    allow_pickle: bool = False


@dataclass
class TrainingRunResult:
    """How a training command ended (shared by finetune and lora train)."""

    output: Path | None
    work_dir: Path
    steps: int
    max_steps: int
    interrupted: bool
    resumed_from: Path | None
    last_checkpoint: Path | None
    first_losses: dict[str, float]
    last_losses: dict[str, float]
    data: dict[str, Any]
    seconds: float
    files: list[Path] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)
    class_images_generated: int = 0


# ---------------------------------------------------------------------------- shared by finetune / lora train


def load_trainable(ref: str, allow_pickle: bool) -> Model:
    from sdcompress.checkpoint.resolve import load_model

    model = load_model(ref, allow_pickle=allow_pickle)
    if model.unet_only:
        raise SdcError(
            f"{ref} is a lone U-Net; give a whole pipeline (its VAE and text encoders are needed) as --model."
        )
    return model


def fit_data(data: DataConfig, model: Model, unet_config: Config | None = None) -> DataConfig:
    """The data settings with the model's default resolution and bucket step, checked.

    `unet_config` is the U-Net that trains when it is not the model's own (distill's student).
    """
    data = replace(
        data,
        resolution=data.resolution or model.family.resolution,
        bucket_step=model_bucket_step(model.configs["vae"], unet_config or model.configs["unet"]),
    )
    data.validate()
    if data.resolution % data.bucket_step:
        raise SdcError(
            f"--resolution {data.resolution} does not fit this model; use a multiple of {data.bucket_step}."
        )
    return data


def build_parts(model: Model) -> DiffusionParts:
    from sdcompress.checkpoint.instantiate import build_pipeline

    return DiffusionParts.from_pipeline(build_pipeline(model, dtype=torch.float32))


def prior_config(class_data: Path | None, data: DataConfig, class_prompt: str | None, weight: float):
    if class_data is None:
        return None
    return PriorPreservation(
        class_data=replace(
            data, data_dir=Path(class_data), dataset_name=None, buckets=False, caption_dropout=0.0
        ),
        class_prompt=class_prompt,
        weight=weight,
    )


def run_training(
    task: UNetTrainingTask, config: TrainConfig, data: DataConfig, progress
) -> TrainingRunResult:
    result: TrainResult = train(task, config, data, progress)
    history = result.loss_history
    terms = lambda entry: {k: v for k, v in entry.items() if k not in ("step", "lr")}  # noqa: E731
    return TrainingRunResult(
        output=result.output_dir,
        work_dir=config.work_dir,
        steps=result.steps,
        max_steps=result.max_steps,
        interrupted=result.interrupted,
        resumed_from=result.resumed_from,
        last_checkpoint=result.last_checkpoint,
        first_losses=terms(history[0]) if history else {},
        last_losses=terms(history[-1]) if history else {},
        data=result.data.to_dict(),
        seconds=result.seconds,
        validation_images=result.validation_images,
    )


def base_record(command: str, model: Model, ref: str, summary: TrainingSummary) -> dict[str, Any]:
    """The run record of a training that starts from `model` (finetune, lora train)."""
    return run_record(command, family=model.family.name, preset=model.preset, summary=summary, base_model=ref)


def save_dtype(requested: str | None, model: Model) -> torch.dtype | None:
    """The dtype to write trained weights in: the one asked for, else the U-Net's own."""
    from sdcompress.choices import resolve_dtype

    if requested:
        return resolve_dtype(requested)
    first = next(iter(model.components["unet"].values()), None)
    return None if first is None else first.dtype


def text_encoder_state(trained: torch.nn.Module, original: StateDict) -> StateDict:
    """A trained encoder's weights under the model's own key names (with or without `text_model.`)."""
    live = module_weights(trained)
    out = {}
    for key in original:
        value = live.get(key)
        if value is None:
            value = live.get(key.removeprefix("text_model.")) if key.startswith("text_model.") else None
        if value is None:
            value = live.get("text_model." + key)
        if value is None:
            raise KeyError(f"trained text encoder has no weight for {key}")
        out[key] = value
    return lazy_state_dict(out)


def trained_model(model: Model, task: UNetTrainingTask) -> Model:
    """The model with the task's trained U-Net (and text encoders when they trained)."""
    trained = model.with_unet(lazy_state_dict(module_weights(task.parts.unet)), dict(model.configs["unet"]))
    if task.train_text_encoders:
        names = [n for n in ("text_encoder", "text_encoder_2") if n in model.components]
        for name, encoder in zip(names, task.parts.text_encoders, strict=True):
            trained.components[name] = text_encoder_state(encoder, model.components[name])
    return trained


# ---------------------------------------------------------------------------- finetune


def finetune(request: FinetuneRequest, progress: ProgressCallback | None = None) -> TrainingRunResult:
    """Run (or resume) a fine-tuning and write the tuned pipeline."""
    from sdcompress.checkpoint.writers import save_diffusers, save_single_file

    inputs = [request.model, request.data.data_dir, request.train.work_dir]
    output = check_output(request.output, overwrite=request.train.overwrite_policy, inputs=inputs, kind="dir")
    request.train.validate()
    if request.text_encoder_lr is not None and request.text_encoder_lr <= 0:
        raise SdcError("--text-encoder-lr must be positive; fix the option and run again.")
    model = load_trainable(request.model, request.allow_pickle)
    data = fit_data(request.data, model)
    dtype = save_dtype(request.save_dtype, model)

    def save(task: UNetTrainingTask, out: Path, summary: TrainingSummary) -> None:
        tuned = trained_model(model, task)
        record = base_record("finetune", model, request.model, summary)
        record |= {
            "train_text_encoder": request.train_text_encoder,
            "text_encoder_lr": request.text_encoder_lr,
            "ema": request.train.ema,
            "snr_gamma": request.loss.snr_gamma,
            "noise_offset": request.loss.noise.offset,
        }
        extra = run_record_file(record)

        def single_file(folder: Path) -> None:
            save_single_file(tuned, folder / SINGLE_FILE, dtype=dtype)

        save_diffusers(
            tuned,
            out,
            dtype=dtype,
            overwrite=True,
            extra_files=extra,
            before_publish=single_file if request.save_single_file else None,
        )

    task = FinetuneTask(
        build_parts(model),
        request.loss,
        train_text_encoders=request.train_text_encoder,
        text_encoder_lr=request.text_encoder_lr,
        seed=request.train.seed,
        saver=save,
    )
    result = run_training(task, replace(request.train, output_dir=output), data, progress)
    if result.output is not None:
        result.files = [result.output] + ([result.output / SINGLE_FILE] if request.save_single_file else [])
    return result
