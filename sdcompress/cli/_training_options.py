"""Options shared by distill, finetune and lora train, declared once; `--config run.toml`; the progress bar.

A run's options can live in a TOML file (`--config run.toml`, keys named like
the options, dashes or underscores, optionally under a table named after the
command); any option given on the command line wins over the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sdcompress.errors import SdcError
from sdcompress.training.data import DataConfig
from sdcompress.training.engine import ProgressEvent, TrainConfig
from sdcompress.training.noise import NoiseConfig
from sdcompress.training.task import LossConfig
from sdcompress.training.validation import ValidationConfig

_DATA = "Data"
_OPT = "Optimisation"
_LOSS = "Loss"
_RUN = "Checkpoints, validation and logging"


def _opt(*names: str, help: str, panel: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


# -- data
Data = Annotated[
    Path | None, _opt("--data", help="Folder of images with .txt captions or metadata.jsonl.", panel=_DATA)
]
DatasetName = Annotated[
    str | None,
    _opt("--dataset-name", help="Hugging Face dataset id (needs `datasets`, online).", panel=_DATA),
]
DatasetSplit = Annotated[str, _opt("--dataset-split", help="Split of --dataset-name.", panel=_DATA)]
ImageColumn = Annotated[str, _opt("--image-column", help="Image column of --dataset-name.", panel=_DATA)]
CaptionColumn = Annotated[
    str, _opt("--caption-column", help="Caption column (dataset or metadata.jsonl).", panel=_DATA)
]
CaptionExtension = Annotated[str, _opt("--caption-extension", help="Sidecar caption suffix.", panel=_DATA)]
Resolution = Annotated[
    int | None, _opt("--resolution", help="Training resolution (default: the model's).", panel=_DATA)
]
RandomCrop = Annotated[bool, _opt("--random-crop", help="Random instead of center crops.", panel=_DATA)]
RandomFlip = Annotated[bool, _opt("--random-flip", help="Flip half of the images horizontally.", panel=_DATA)]
CaptionDropout = Annotated[
    float, _opt("--caption-dropout", help="Fraction of captions replaced by the empty caption.", panel=_DATA)
]
Buckets = Annotated[
    bool, _opt("--buckets", help="Aspect-ratio buckets instead of square crops.", panel=_DATA)
]
RequireCaptions = Annotated[
    bool,
    _opt("--require-captions", help="Refuse images without a caption (default: empty caption).", panel=_DATA),
]
CacheLatents = Annotated[
    bool, _opt("--cache-latents", help="Encode each image once (needs center crop, no flip).", panel=_DATA)
]
NumWorkers = Annotated[int, _opt("--num-workers", help="Data loader worker processes.", panel=_DATA)]

# -- optimisation
MaxSteps = Annotated[int | None, _opt("--max-steps", help="Optimizer steps to train.", panel=_OPT)]
Epochs = Annotated[int | None, _opt("--epochs", help="Epochs to train (instead of --max-steps).", panel=_OPT)]
BatchSize = Annotated[int, _opt("--batch-size", help="Images per GPU per micro-batch.", panel=_OPT)]
GradAccum = Annotated[int, _opt("--grad-accum", help="Micro-batches per optimizer step.", panel=_OPT)]
LearningRate = Annotated[float, _opt("--lr", help="Learning rate.", panel=_OPT)]
LrScheduler = Annotated[
    str, _opt("--lr-scheduler", help="constant, constant_with_warmup, linear, cosine, ...", panel=_OPT)
]
WarmupSteps = Annotated[int, _opt("--warmup-steps", help="Linear warmup steps.", panel=_OPT)]
Optimizer = Annotated[str, _opt("--optimizer", help="adamw or adamw8bit (bitsandbytes).", panel=_OPT)]
WeightDecay = Annotated[float, _opt("--weight-decay", help="AdamW weight decay.", panel=_OPT)]
MaxGradNorm = Annotated[float, _opt("--max-grad-norm", help="Gradient clipping norm (0: off).", panel=_OPT)]
MixedPrecision = Annotated[str, _opt("--mixed-precision", help="no, fp16 or bf16.", panel=_OPT)]
GradientCheckpointing = Annotated[
    bool, _opt("--gradient-checkpointing", help="Recompute activations to save memory.", panel=_OPT)
]
Seed = Annotated[int, _opt("--seed", help="Seed for data order, augmentation and noise.", panel=_OPT)]
Cpu = Annotated[bool, _opt("--cpu", help="Train on the CPU even when a GPU is present.", panel=_OPT)]

# -- loss
SnrGamma = Annotated[
    float | None, _opt("--snr-gamma", help="Min-SNR weighting gamma (5 is usual).", panel=_LOSS)
]
NoiseOffset = Annotated[float, _opt("--noise-offset", help="Noise offset (0.05-0.1 is usual).", panel=_LOSS)]
PredictionType = Annotated[
    str | None, _opt("--prediction-type", help="epsilon or v_prediction (default: the model's).", panel=_LOSS)
]

# -- run state
WorkDir = Annotated[
    Path | None,
    _opt("--work-dir", help="Checkpoints, validation grids, logs (default: OUTPUT.train).", panel=_RUN),
]
CheckpointEvery = Annotated[
    int, _opt("--checkpoint-every", help="Save a checkpoint every N steps.", panel=_RUN)
]
KeepCheckpoints = Annotated[
    int, _opt("--keep-checkpoints", help="Keep the last K checkpoints (0: all).", panel=_RUN)
]
Resume = Annotated[str | None, _opt("--resume", help="latest or a checkpoint folder.", panel=_RUN)]
Ema = Annotated[bool, _opt("--ema", help="Keep an EMA of the weights and save it.", panel=_RUN)]
EmaDecay = Annotated[float, _opt("--ema-decay", help="EMA decay.", panel=_RUN)]
ValidationPrompt = Annotated[
    list[str] | None,
    _opt("--validation-prompt", help="Prompt for validation grids (repeatable).", panel=_RUN),
]
ValidationSeed = Annotated[
    list[int] | None, _opt("--validation-seed", help="Seed per grid column (repeatable).", panel=_RUN)
]
ValidationEvery = Annotated[
    int, _opt("--validation-every", help="Render the grid every N steps.", panel=_RUN)
]
ValidationSteps = Annotated[int, _opt("--validation-steps", help="Inference steps per image.", panel=_RUN)]
ReportTo = Annotated[str, _opt("--report-to", help="none, tensorboard or wandb.", panel=_RUN)]
Config = Annotated[
    Path | None,
    _opt("--config", help="TOML file with any of these options; the command line wins.", panel=_RUN),
]


# ---------------------------------------------------------------------------- --config


def read_config_file(path: Path, command: str) -> dict[str, Any]:
    """Options from a TOML file: top-level keys, overridden by a table named after the command."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdcError(f"config file {path} does not exist; check the --config path.") from None
    except tomllib.TOMLDecodeError as exc:
        raise SdcError(f"config file {path} is not valid TOML ({exc}); fix the file.") from exc
    section = data.pop(command, {}) if isinstance(data.get(command), dict) else {}
    merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
    merged.update(section)
    return {key.replace("-", "_"): value for key, value in merged.items()}


def with_config_file(ctx: Any, command: str) -> dict[str, Any]:
    """The command's parameters, with values from `--config` where the command line gave none."""
    params = dict(ctx.params)
    path = params.get("config")
    if not path:
        return params
    by_name = {p.name: p for p in ctx.command.params}
    for key, value in read_config_file(path, command).items():
        if key not in by_name or key == "config":
            raise SdcError(f"config file {path} has an unknown option {key!r}; remove it or fix its name.")
        source = ctx.get_parameter_source(key)
        if source is not None and source.name == "COMMANDLINE":  # by name: typer may vendor its own click
            continue
        try:
            params[key] = by_name[key].process_value(ctx, value)
        except Exception as exc:  # the parameter's own conversion error, whichever click raised it
            message = getattr(exc, "message", str(exc))
            raise SdcError(f"config file {path}: option {key!r} has a bad value ({message}).") from exc
    return params


def require(params: dict[str, Any], **options: str) -> None:
    """Options that may come from the command line or the config file but must come from one of them."""
    for key, flag in options.items():
        if params.get(key) in (None, ""):
            raise SdcError(f"{flag} is required; give it on the command line or in the --config file.")


# ---------------------------------------------------------------------------- requests


def data_config(p: dict[str, Any], default_resolution: int) -> DataConfig:
    return DataConfig(
        data_dir=p.get("data"),
        dataset_name=p.get("dataset_name"),
        dataset_split=p["dataset_split"],
        image_column=p["image_column"],
        caption_column=p["caption_column"],
        caption_extension=p["caption_extension"],
        resolution=p.get("resolution") or default_resolution,
        center_crop=not p["random_crop"],
        random_flip=p["random_flip"],
        caption_dropout=p["caption_dropout"],
        buckets=p["buckets"],
        require_captions=p["require_captions"],
    )


def loss_config(p: dict[str, Any]) -> LossConfig:
    if p["cache_latents"] and (p["random_crop"] or p["random_flip"]):
        raise SdcError("--cache-latents needs fixed images; drop --random-crop and --random-flip.")
    return LossConfig(
        noise=NoiseConfig(offset=p["noise_offset"], prediction_type=p.get("prediction_type")),
        snr_gamma=p.get("snr_gamma"),
        cache_latents=p["cache_latents"],
    )


def train_config(p: dict[str, Any], output: Path) -> TrainConfig:
    prompts = tuple(p.get("validation_prompt") or ())
    seeds = tuple(p.get("validation_seed") or (0,))
    return TrainConfig(
        work_dir=Path(p.get("work_dir") or output.with_name(output.name + ".train")),
        output_dir=output,
        overwrite=p["overwrite"],
        max_steps=p.get("max_steps") if p.get("max_steps") or not p.get("epochs") else None,
        epochs=p.get("epochs"),
        batch_size=p["batch_size"],
        grad_accum=p["grad_accum"],
        lr=p["lr"],
        lr_scheduler=p["lr_scheduler"],
        warmup_steps=p["warmup_steps"],
        optimizer=p["optimizer"],
        weight_decay=p["weight_decay"],
        max_grad_norm=p["max_grad_norm"] or None,
        mixed_precision=p["mixed_precision"],
        gradient_checkpointing=p["gradient_checkpointing"],
        seed=p["seed"],
        checkpoint_every=p["checkpoint_every"],
        keep_checkpoints=p["keep_checkpoints"] or None,
        resume=p.get("resume"),
        ema=p["ema"],
        ema_decay=p["ema_decay"],
        validation=ValidationConfig(
            prompts=prompts, seeds=seeds, every=p["validation_every"], steps=p["validation_steps"]
        ),
        report_to=p["report_to"],
        num_workers=p["num_workers"],
        cpu=p["cpu"],
    )


# ---------------------------------------------------------------------------- progress


class TrainingProgress:
    """A rich progress bar on stderr fed by the engine's events: step, loss terms, lr, it/s."""

    def __init__(self, console, *, disable: bool = False) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[terms]}"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=disable,
        )
        self.task_id = None
        self.disable = disable

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: ProgressEvent) -> None:
        if self.task_id is None:
            self.task_id = self.progress.add_task("training", total=event.max_steps, terms="", speed="")
            self.progress.update(self.task_id, completed=event.step)
        if event.kind == "step":
            terms = " ".join(f"{k}={v:.4g}" for k, v in event.losses.items())
            self.progress.update(
                self.task_id,
                completed=event.step,
                terms=f"{terms} lr={event.lr:.2e}",
                speed=f"{event.it_per_s:.2f} it/s",
            )
        elif event.kind == "start" and event.message:
            self.progress.console.print(f"[dim]{event.message}[/dim]")
        elif event.kind in ("checkpoint", "validation", "interrupted") and not self.disable:
            self.progress.console.print(f"[dim]{event.kind} at step {event.step}: {event.path}[/dim]")
