"""`sdcompress hypernetwork train --model REF --data IMAGES -o OUT`: an A1111 hypernetwork.

The options are generated from the training dataclasses and `HypernetworkSpec`
(`cli/_training_options.py`); this module maps them to the service request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import typer

from sdcompress.choices import DType
from sdcompress.cli import _training_options as T
from sdcompress.training import config as C
from sdcompress.training.hypernetwork_spec import HYPERNETWORK, HypernetworkSpec

app = typer.Typer(help="Train A1111 hypernetworks.", no_args_is_help=True)


@dataclass(frozen=True)
class HypernetworkOptions:
    model: str | None = field(
        default=None,
        metadata=C.option("--model", "Base pipeline: folder, file, hub id, SD15 or tiny-sd. Required."),
    )
    name: str | None = field(
        default=None,
        metadata=C.option("--name", "File name (default: the output folder's).", HYPERNETWORK),
    )


def run(parsed: T.Parsed) -> None:
    from sdcompress.cli._output import err, success
    from sdcompress.services.hypernetwork_train import HypernetworkTrainRequest, hypernetwork_train

    opts, out = parsed[HypernetworkOptions], parsed[T.OutputOptions]
    train, data, loss = parsed[C.TrainConfig], parsed[C.DataConfig], parsed[C.LossConfig]
    C.check_cache_latents(data, loss)
    request = HypernetworkTrainRequest(
        model=opts.model,
        output=train.output_dir,
        data=data,
        train=train,
        spec=parsed[HypernetworkSpec],
        loss=loss,
        name=opts.name,
        save_dtype=out.dtype,
        allow_pickle=out.allow_pickle,
    )
    with T.TrainingProgress(err, disable=out.json) as progress:
        result = hypernetwork_train(request, progress)
    T.report(result, out.json)
    if not out.json:
        success(f"wrote {', '.join(map(str, result.files))} ({result.steps} steps)")


train = app.command("train")(
    T.training_command(
        T.TrainingCommand(
            name="hypernetwork",
            sections=(
                C.DataConfig,
                C.LossConfig,
                HypernetworkSpec,
                HypernetworkOptions,
                C.TrainConfig,
                T.OutputOptions,
            ),
            panels=(None, C.DATA, HYPERNETWORK, C.OPTIMISATION, C.LOSS, C.RUN),
            run=run,
            required=("model", "output"),
            defaults={"lr": 1e-5, "dtype": DType.FP32},
            helps={
                "output": "Folder for the hypernetwork file. Required.",
                "dtype": "fp32 (default), fp16 or bf16.",
            },
            doc="""Train an AUTOMATIC1111 hypernetwork (a residual MLP on the key and value inputs of attention, per
    context width) on a frozen pipeline.

    Writes OUTPUT/<name>.pt, which A1111 (models/hypernetworks) and ComfyUI
    (HypernetworkLoader) load. Rerun with --resume latest after a stop.
    """,
        )
    )
)
