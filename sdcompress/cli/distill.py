"""`sdcompress distill --teacher REF --student DIR --data IMAGES -o OUT`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdcompress.cli import _training_options as T
from sdcompress.cli._options import AllowPickle, DType, Json, Overwrite, OverwriteForeign
from sdcompress.cli._output import emit_json, err, note, success, table
from sdcompress.training.distill_task import DistillWeights
from sdcompress.training.features import FEATURE_MODES


def distill(
    ctx: typer.Context,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="Teacher pipeline: folder, file, hub id or tiny-sd. Required."),
    ] = None,
    student: Annotated[
        str | None, typer.Option("--student", help="Student U-Net (e.g. a `prune` output). Required.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder for the distilled pipeline. Required.")
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
    features: Annotated[
        str, typer.Option("--features", help=f"Feature taps: {', '.join(FEATURE_MODES)}.")
    ] = "blocks",
    feature_norm: Annotated[
        bool, typer.Option("--feature-norm", help="Divide each feature term by the teacher feature's scale.")
    ] = False,
    task_weight: Annotated[float, typer.Option("--task-weight", help="Weight of the diffusion loss.")] = 1.0,
    output_weight: Annotated[
        float, typer.Option("--output-weight", help="Weight of MSE(student, teacher output).")
    ] = 1.0,
    feature_weight: Annotated[
        float, typer.Option("--feature-weight", help="Weight of the feature MSEs.")
    ] = 1.0,
    max_steps: T.MaxSteps = 1000,
    epochs: T.Epochs = None,
    batch_size: T.BatchSize = 1,
    grad_accum: T.GradAccum = 1,
    lr: T.LearningRate = 5e-5,
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
    """Distill a pruned student U-Net from its teacher (task + output + feature losses, BK-SDM style).

    Checkpoints go to OUTPUT.train/ (or --work-dir); rerun with --resume latest after a stop.
    Multi-GPU: `accelerate launch -m sdcompress distill ...` with the same options.
    """
    from sdcompress.services.distill import DistillRequest
    from sdcompress.services.distill import distill as run_distill

    p = T.with_config_file(ctx, "distill")
    T.require(p, teacher="--teacher", student="--student", output="--output")
    out = Path(p["output"])
    request = DistillRequest(
        teacher=p["teacher"],
        student=p["student"],
        output=out,
        data=T.data_config(p, default_resolution=0),
        train=T.train_config(p, out),
        features=p["features"],
        feature_norm=p["feature_norm"],
        weights=DistillWeights(
            task=p["task_weight"], output=p["output_weight"], features=p["feature_weight"]
        ),
        loss=T.loss_config(p),
        save_dtype=p.get("save_dtype"),
        allow_pickle=p["allow_pickle"],
    )
    with T.TrainingProgress(err, disable=p["json_"]) as progress:
        result = run_distill(request, progress)
    if p["json_"]:
        emit_json(result.__dict__ | {"feature_pairs": [fp.to_dict() for fp in result.feature_pairs]})
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
    if not p["json_"]:
        success(f"wrote {result.output} ({result.steps} steps, {len(result.feature_pairs)} feature pairs)")
