"""`sdcompress finetune --model REF --data IMAGES -o OUT`.

The options are generated from the training dataclasses (`cli/_training_options.py`);
this module adds the few that only fine-tuning has and maps them to the service request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdcompress.cli import _training_options as T
from sdcompress.training import config as C

FINETUNE = "Fine-tuning"


@dataclass(frozen=True)
class FinetuneOptions:
    model: str | None = field(
        default=None,
        metadata=C.option("--model", "Pipeline to tune: folder, file, hub id, SD15 or tiny-sd. Required."),
    )
    train_text_encoder: bool = field(
        default=False, metadata=C.option("--train-text-encoder", "Also train the text encoder(s).", FINETUNE)
    )
    text_encoder_lr: float | None = field(default=None, metadata=T.text_encoder_lr(FINETUNE))
    save_single_file: bool = field(
        default=False,
        metadata=C.option(
            "--save-single-file", "Also write OUTPUT/model.safetensors (single file).", FINETUNE
        ),
    )


def run(parsed: T.Parsed) -> None:
    from sdcompress.cli._output import err, success
    from sdcompress.services.finetune import FinetuneRequest, finetune

    opts, out = parsed[FinetuneOptions], parsed[T.OutputOptions]
    train, data, loss = parsed[C.TrainConfig], parsed[C.DataConfig], parsed[C.LossConfig]
    C.check_cache_latents(data, loss)
    request = FinetuneRequest(
        model=opts.model,
        output=train.output_dir,
        data=data,
        train=train,
        loss=loss,
        train_text_encoder=opts.train_text_encoder,
        text_encoder_lr=opts.text_encoder_lr,
        save_single_file=opts.save_single_file,
        save_dtype=out.dtype,
        allow_pickle=out.allow_pickle,
    )
    with T.TrainingProgress(err, disable=out.json) as progress:
        result = finetune(request, progress)
    T.report(result, out.json)
    if not out.json:
        success(f"wrote {', '.join(map(str, result.files))} ({result.steps} steps)")


finetune = T.training_command(
    T.TrainingCommand(
        name="finetune",
        sections=(FinetuneOptions, C.DataConfig, C.LossConfig, C.TrainConfig, T.OutputOptions),
        panels=(None, C.DATA, FINETUNE, C.OPTIMISATION, C.LOSS, C.RUN),
        run=run,
        required=("model", "output"),
        helps={"output": "Folder for the tuned pipeline. Required."},
        doc="""Fine-tune a pipeline's U-Net (and optionally its text encoders) on captioned images.

    Works on SD 1.x, SD 2.x, SDXL and pruned students. With --ema the saved weights are the EMA weights.
    Checkpoints go to OUTPUT.train/ (or --work-dir); rerun with --resume latest after a stop.
    Multi-GPU: `accelerate launch -m sdcompress finetune ...` with the same options.
    """,
    )
)
