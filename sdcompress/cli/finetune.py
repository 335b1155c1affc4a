"""`sdcompress finetune --model REF --data IMAGES -o OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdcompress.cli import _training_options as T
from sdcompress.cli._options import AllowPickle, DType, Json, Overwrite, OverwriteForeign
from sdcompress.cli._output import emit_json, err, note, success, table


def finetune(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Pipeline to tune: folder, file, hub id, SD15 or tiny-sd. Required."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder for the tuned pipeline. Required.")
    ] = None,
    data: T.Data = None,
    dataset_name: T.DatasetName = None,
    dataset_split: T.DatasetSplit = "train",
    image_column: T.ImageColumn = "image",
    caption_column: T.CaptionColumn = "text",
    caption_extension: T.CaptionExtension = ".txt",
    resolution: T.Resolution = None,
    random_crop: T.RandomCrop = False,
    random_flip: T.RandomFlip = False,
    caption_dropout: T.CaptionDropout = 0.0,
    buckets: T.Buckets = False,
    require_captions: T.RequireCaptions = False,
    cache_latents: T.CacheLatents = False,
    num_workers: T.NumWorkers = 2,
    train_text_encoder: Annotated[
        bool, typer.Option("--train-text-encoder", help="Also train the text encoder(s).")
    ] = False,
    text_encoder_lr: Annotated[
        float | None, typer.Option("--text-encoder-lr", help="Text-encoder learning rate (default: --lr).")
    ] = None,
    save_single_file: Annotated[
        bool, typer.Option("--save-single-file", help="Also write OUTPUT/model.safetensors (single file).")
    ] = False,
    max_steps: T.MaxSteps = 1000,
    epochs: T.Epochs = None,
    batch_size: T.BatchSize = 1,
    grad_accum: T.GradAccum = 1,
    lr: T.LearningRate = 1e-5,
    lr_scheduler: T.LrScheduler = "constant",
    warmup_steps: T.WarmupSteps = 0,
    optimizer: T.Optimizer = "adamw",
    weight_decay: T.WeightDecay = 1e-2,
    max_grad_norm: T.MaxGradNorm = 1.0,
    mixed_precision: T.MixedPrecision = "no",
    gradient_checkpointing: T.GradientCheckpointing = False,
    seed: T.Seed = 0,
    cpu: T.Cpu = False,
    snr_gamma: T.SnrGamma = None,
    noise_offset: T.NoiseOffset = 0.0,
    prediction_type: T.PredictionType = None,
    work_dir: T.WorkDir = None,
    checkpoint_every: T.CheckpointEvery = 500,
    keep_checkpoints: T.KeepCheckpoints = 3,
    resume: T.Resume = None,
    ema: T.Ema = False,
    ema_decay: T.EmaDecay = 0.9999,
    validation_prompt: T.ValidationPrompt = None,
    validation_seed: T.ValidationSeed = None,
    validation_every: T.ValidationEvery = 0,
    validation_steps: T.ValidationSteps = 20,
    report_to: T.ReportTo = "none",
    save_dtype: DType = None,
    config: T.Config = None,
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    allow_pickle: AllowPickle = False,
    json_: Json = False,
) -> None:
    """Fine-tune a pipeline's U-Net (and optionally its text encoders) on captioned images.

    Works on SD 1.x, SD 2.x, SDXL and pruned students. With --ema the saved weights are the EMA weights.
    Checkpoints go to OUTPUT.train/ (or --work-dir); rerun with --resume latest after a stop.
    Multi-GPU: `accelerate launch -m sdcompress finetune ...` with the same options.
    """
    from sdcompress.services.finetune import FinetuneRequest
    from sdcompress.services.finetune import finetune as run_finetune

    p = T.with_config_file(ctx, "finetune")
    T.require(p, model="--model", output="--output")
    out = Path(p["output"])
    request = FinetuneRequest(
        model=p["model"],
        output=out,
        data=T.data_config(p, default_resolution=0),
        train=T.train_config(p, out),
        loss=T.loss_config(p),
        train_text_encoder=p["train_text_encoder"],
        text_encoder_lr=p.get("text_encoder_lr"),
        save_single_file=p["save_single_file"],
        save_dtype=p.get("save_dtype"),
        allow_pickle=p["allow_pickle"],
    )
    with T.TrainingProgress(err, disable=p["json_"]) as progress:
        result = run_finetune(request, progress)
    report(result, p["json_"])
    if not p["json_"] and not result.interrupted:
        success(f"wrote {', '.join(map(str, result.files))} ({result.steps} steps)")


def report(result, as_json: bool) -> None:
    """Loss table (or JSON), data notes, and exit 130 after an interrupted run."""
    if as_json:
        emit_json(result.__dict__)
    else:
        rows = [
            (k, f"{result.first_losses.get(k, float('nan')):.4g}", f"{v:.4g}")
            for k, v in result.last_losses.items()
        ]
        table("loss terms", ["term", "first step", "last step"], rows, right=["first step", "last step"])
        if result.data.get("unreadable") or result.data.get("missing_captions"):
            note(
                f"data: {result.data['images']} images used, {result.data['unreadable']} unreadable skipped, "
                f"{result.data['missing_captions']} without caption (trained with an empty caption)"
            )
    if result.interrupted:
        note(
            f"stopped at step {result.steps}; checkpoint {result.last_checkpoint}; rerun with --resume latest"
        )
        raise typer.Exit(130)
