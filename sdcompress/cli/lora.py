"""`sdcompress lora train --model REF --data IMAGES -o OUT`: LoRA / DoRA / LoHa / LoKr with peft, DreamBooth too.

The options are generated from the training dataclasses (`cli/_training_options.py`);
this module adds the few that only LoRA training has and maps them to the service request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import typer

from sdcompress.choices import DType
from sdcompress.cli import _training_options as T
from sdcompress.training import config as C

app = typer.Typer(help="Train LoRA adapters.", no_args_is_help=True)


@dataclass(frozen=True)
class LoraOptions:
    model: str | None = field(
        default=None,
        metadata=C.option("--model", "Base pipeline: folder, file, hub id, SD15 or tiny-sd. Required."),
    )
    text_encoder_lr: float | None = field(default=None, metadata=T.text_encoder_lr(C.ADAPTER))
    format: str = field(
        default="kohya",
        metadata=C.option("--format", "kohya (default), peft, or both: kohya,peft.", C.ADAPTER),
    )
    name: str | None = field(
        default=None,
        metadata=C.option("--name", "kohya file name (default: the output folder's).", C.ADAPTER),
    )


def run(parsed: T.Parsed) -> None:
    from sdcompress.cli._output import err, note, success
    from sdcompress.services.lora_train import LoraTrainRequest, lora_train

    opts, out = parsed[LoraOptions], parsed[T.OutputOptions]
    train, data, loss = parsed[C.TrainConfig], parsed[C.DataConfig], parsed[C.LossConfig]
    C.check_cache_latents(data, loss)
    request = LoraTrainRequest(
        model=opts.model,
        output=train.output_dir,
        data=data,
        train=train,
        adapter=parsed[C.AdapterSpec],
        loss=loss,
        text_encoder_lr=opts.text_encoder_lr,
        dreambooth=parsed[C.DreamBooth],
        format=opts.format,
        name=opts.name,
        save_dtype=out.dtype,
        allow_pickle=out.allow_pickle,
    )
    with T.TrainingProgress(err, disable=out.json) as progress:
        result = lora_train(request, progress)
    T.report(result, out.json)
    if result.class_images_generated and not out.json:
        note(f"generated {result.class_images_generated} class images with the base model")
    if not out.json:
        success(f"wrote {', '.join(map(str, result.files))} ({result.steps} steps)")


train = app.command("train")(
    T.training_command(
        T.TrainingCommand(
            name="lora",
            sections=(
                C.DataConfig,
                C.LossConfig,
                C.AdapterSpec,
                LoraOptions,
                C.DreamBooth,
                C.TrainConfig,
                T.OutputOptions,
            ),
            panels=(None, C.DATA, C.ADAPTER, C.DREAMBOOTH, C.OPTIMISATION, C.LOSS, C.RUN),
            run=run,
            required=("model", "output"),
            defaults={"lr": 1e-4, "dtype": DType.FP16},
            helps={
                "output": "Folder for the LoRA file(s). Required.",
                "dtype": "fp16 (default), bf16 or fp32.",
            },
            doc="""Train a LoRA (or DoRA / LoHa / LoKr) on a pipeline's U-Net, optionally its text encoders; DreamBooth with
    --instance-prompt and --class-data and/or --class-prompt (missing class images are generated first).

    Writes OUTPUT/<name>.safetensors (kohya layout with ss_* metadata) and/or
    OUTPUT/pytorch_lora_weights.safetensors (PEFT layout). Rerun with --resume latest after a stop.
    """,
        )
    )
)
