"""`sdcompress lora train --model REF --data IMAGES -o OUT`: LoRA / LoHa / LoKr with peft, DreamBooth too."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdcompress.cli import _training_options as T
from sdcompress.cli._options import AllowPickle, Json, Overwrite, OverwriteForeign
from sdcompress.cli._output import err, note, success
from sdcompress.cli.finetune import report
from sdcompress.training.lora_task import ADAPTER_TYPES, TARGET_SETS

app = typer.Typer(help="Train LoRA adapters.", no_args_is_help=True)
_LORA = "Adapter"
_DB = "DreamBooth"


@app.command("train")
def train(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Base pipeline: folder, file, hub id, SD15 or tiny-sd. Required."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder for the LoRA file(s). Required.")
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
    rank: Annotated[int, typer.Option("--rank", help="Adapter rank.", rich_help_panel=_LORA)] = 16,
    alpha: Annotated[
        float | None,
        typer.Option("--alpha", help="Adapter alpha (default: the rank).", rich_help_panel=_LORA),
    ] = None,
    dropout: Annotated[
        float, typer.Option("--dropout", help="Adapter dropout.", rich_help_panel=_LORA)
    ] = 0.0,
    targets: Annotated[
        str,
        typer.Option(
            "--targets",
            help=f"U-Net modules: {', '.join(TARGET_SETS)} (all adds convs).",
            rich_help_panel=_LORA,
        ),
    ] = "attention",
    type_: Annotated[
        str, typer.Option("--type", help=f"Adapter type: {', '.join(ADAPTER_TYPES)}.", rich_help_panel=_LORA)
    ] = "lora",
    text_encoder: Annotated[
        bool, typer.Option("--text-encoder", help="Also adapt the text encoder(s).", rich_help_panel=_LORA)
    ] = False,
    text_encoder_lr: Annotated[
        float | None,
        typer.Option(
            "--text-encoder-lr", help="Text-encoder learning rate (default: --lr).", rich_help_panel=_LORA
        ),
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", help="kohya (default), peft or both.", rich_help_panel=_LORA)
    ] = "kohya",
    name: Annotated[
        str | None,
        typer.Option("--name", help="kohya file name (default: the output folder's).", rich_help_panel=_LORA),
    ] = None,
    save_dtype: Annotated[
        str, typer.Option("--save-dtype", help="fp16 (default), bf16 or fp32.", rich_help_panel=_LORA)
    ] = "fp16",
    instance_prompt: Annotated[
        str | None,
        typer.Option("--instance-prompt", help="Caption for every training image.", rich_help_panel=_DB),
    ] = None,
    class_data: Annotated[
        Path | None,
        typer.Option(
            "--class-data",
            help="Folder of class images (prior preservation); default with --class-prompt: OUTPUT.class-images.",
            rich_help_panel=_DB,
        ),
    ] = None,
    class_prompt: Annotated[
        str | None,
        typer.Option(
            "--class-prompt",
            help="Caption for every class image; missing class images are generated from it by the base model.",
            rich_help_panel=_DB,
        ),
    ] = None,
    num_class_images: Annotated[
        int | None,
        typer.Option(
            "--num-class-images",
            help="Class images wanted; the base model makes the missing ones (default 100).",
            rich_help_panel=_DB,
        ),
    ] = None,
    class_inference_steps: Annotated[
        int,
        typer.Option(
            "--class-inference-steps", help="Inference steps per generated class image.", rich_help_panel=_DB
        ),
    ] = 30,
    prior_loss_weight: Annotated[
        float,
        typer.Option("--prior-loss-weight", help="Weight of the class (prior) loss.", rich_help_panel=_DB),
    ] = 1.0,
    max_steps: T.MaxSteps = 1000,
    epochs: T.Epochs = None,
    batch_size: T.BatchSize = 1,
    grad_accum: T.GradAccum = 1,
    lr: T.LearningRate = 1e-4,
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
    config: T.Config = None,
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    allow_pickle: AllowPickle = False,
    json_: Json = False,
) -> None:
    """Train a LoRA (or LoHa / LoKr) on a pipeline's U-Net, optionally its text encoders; DreamBooth with
    --instance-prompt and --class-data and/or --class-prompt (missing class images are generated first).

    Writes OUTPUT/<name>.safetensors (kohya layout with ss_* metadata) and/or
    OUTPUT/pytorch_lora_weights.safetensors (PEFT layout). Rerun with --resume latest after a stop.
    """
    from sdcompress.services.lora_train import DreamBooth, LoraTrainRequest, lora_train
    from sdcompress.training.lora_task import AdapterSpec

    p = T.with_config_file(ctx, "lora")
    T.require(p, model="--model", output="--output")
    out = Path(p["output"])
    request = LoraTrainRequest(
        model=p["model"],
        output=out,
        data=T.data_config(p, default_resolution=0),
        train=T.train_config(p, out),
        adapter=AdapterSpec(
            type=p["type_"],
            rank=p["rank"],
            alpha=p.get("alpha"),
            dropout=p["dropout"],
            targets=p["targets"],
            text_encoder=p["text_encoder"],
        ),
        loss=T.loss_config(p),
        text_encoder_lr=p.get("text_encoder_lr"),
        dreambooth=DreamBooth(
            instance_prompt=p.get("instance_prompt"),
            class_data=p.get("class_data"),
            class_prompt=p.get("class_prompt"),
            prior_loss_weight=p["prior_loss_weight"],
            num_class_images=p.get("num_class_images"),
            class_inference_steps=p["class_inference_steps"],
        ),
        format=p["format_"],
        name=p.get("name"),
        save_dtype=p["save_dtype"],
        allow_pickle=p["allow_pickle"],
    )
    with T.TrainingProgress(err, disable=p["json_"]) as progress:
        result = lora_train(request, progress)
    report(result, p["json_"])
    if result.class_images_generated and not p["json_"]:
        note(f"generated {result.class_images_generated} class images with the base model")
    if not p["json_"]:
        success(f"wrote {', '.join(map(str, result.files))} ({result.steps} steps)")
