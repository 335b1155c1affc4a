"""`sdcompress embedding train --model REF --data IMAGES --token T --init-words W -o OUT`: textual inversion.

The options are generated from the training dataclasses (`cli/_training_options.py`);
`EmbeddingSpec` (training/config.py) declares the textual-inversion ones, this module
adds the few that only this command has and maps them to the service request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import typer

from sdcompress.cli import _training_options as T
from sdcompress.training import config as C

app = typer.Typer(help="Train textual-inversion embeddings.", no_args_is_help=True)


@dataclass(frozen=True)
class EmbeddingOptions:
    model: str | None = field(
        default=None,
        metadata=C.option("--model", "Base pipeline: folder, file, hub id, SD15 or tiny-sd. Required."),
    )
    name: str | None = field(
        default=None,
        metadata=C.option("--name", "A1111/ComfyUI file name (default: the token without < >).", C.EMBEDDING),
    )


def run(parsed: T.Parsed) -> None:
    from sdcompress.cli._output import err, success
    from sdcompress.services.embedding_train import EmbeddingTrainRequest, embedding_train

    opts, out = parsed[EmbeddingOptions], parsed[T.OutputOptions]
    train, data, loss = parsed[C.TrainConfig], parsed[C.DataConfig], parsed[C.LossConfig]
    C.check_cache_latents(data, loss)
    request = EmbeddingTrainRequest(
        model=opts.model,
        output=train.output_dir,
        data=data,
        train=train,
        embedding=parsed[C.EmbeddingSpec],
        loss=loss,
        name=opts.name,
        save_dtype=out.dtype,
        allow_pickle=out.allow_pickle,
    )
    with T.TrainingProgress(err, disable=out.json) as progress:
        result = embedding_train(request, progress)
    T.report(result, out.json)
    if not out.json:
        success(f"wrote {', '.join(map(str, result.files))} ({result.steps} steps)")


train = app.command("train")(
    T.training_command(
        T.TrainingCommand(
            name="embedding",
            sections=(
                C.DataConfig,
                C.LossConfig,
                C.EmbeddingSpec,
                EmbeddingOptions,
                C.TrainConfig,
                T.OutputOptions,
            ),
            panels=(None, C.DATA, C.EMBEDDING, C.OPTIMISATION, C.LOSS, C.RUN),
            run=run,
            required=("model", "output", "token", "init_words"),
            defaults={"lr": 5e-3},
            helps={
                "output": "Folder for the embedding files. Required.",
                "dtype": "fp32 (default), fp16 or bf16.",
            },
            doc="""Train a textual-inversion embedding: a new token whose vectors (one set per text encoder)
    learn a concept from a few images; the model itself does not change.

    Writes OUTPUT/<name>.safetensors (A1111 / ComfyUI: emb_params, or clip_l + clip_g for SDXL) and
    OUTPUT/learned_embeds.safetensors (+ learned_embeds_2 for SDXL) for diffusers' load_textual_inversion.
    Rerun with --resume latest after a stop.
    """,
        )
    )
)
