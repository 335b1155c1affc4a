"""`sdcompress merge`: LoRAs into checkpoints, LoRA + LoRA, and checkpoint merges."""

from __future__ import annotations

from typing import Annotated

import typer

from sdcompress.choices import LoraFormat, MergeMethod, resolve_dtype
from sdcompress.cli._lowrank_progress import progress_bar
from sdcompress.cli._options import (
    AllowNonfinite,
    AllowPickle,
    DType,
    Json,
    Output,
    Overwrite,
    OverwriteForeign,
)
from sdcompress.cli._output import emit_json, note, success


def merge(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Models: BASE to bake LoRAs into, or A B [C ...] to merge. None: merge LoRAs."),
    ] = None,
    output: Output = ...,  # type: ignore[assignment]
    lora: Annotated[
        list[str] | None,
        typer.Option("--lora", help="LoRA file[:WEIGHT] (repeatable; kohya, PEFT, LyCORIS)."),
    ] = None,
    method: Annotated[
        MergeMethod | None,
        typer.Option(
            "--method",
            help="Checkpoint merges (default: weighted-sum for two models, add-difference for three).",
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option("--alpha", help="weighted-sum: share of B; add-difference/ties/dare: scale."),
    ] = None,
    block_weights: Annotated[
        str | None,
        typer.Option(
            "--block-weights",
            help="Checkpoint merges: per-block alpha, e.g. 'down=0.2,mid=0.5,up=0.8,te=0'. Names: unet, "
            "down, down.N, mid, up, up.N, other (conv_in, embeddings, conv_out), te, te1, te2, vae; "
            "the most specific wins, unnamed tensors use --alpha.",
        ),
    ] = None,
    density: Annotated[
        float | None, typer.Option("--density", help="ties: share kept; dare: keep rate.")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="dare's random drop (default 0).")] = None,
    embedding: Annotated[
        list[str] | None,
        typer.Option(
            "--embedding",
            help="Textual-inversion file or folder to bake in as a new token (repeatable; diffusers output).",
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="LoRA + LoRA: re-rank by SVD (with one LoRA: resize it).")
    ] = None,
    fmt: Annotated[
        LoraFormat | None, typer.Option("--format", help="Layout of a merged LoRA (default kohya).")
    ] = None,
    dtype: DType = None,
    json_: Json = False,
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    allow_pickle: AllowPickle = False,
    allow_nonfinite: AllowNonfinite = False,
) -> None:
    """Merge models and LoRAs, tensor by tensor. Output .safetensors: one file; else a diffusers folder."""
    # These load torch: imported when the command runs, so --help and usage errors stay fast.
    from sdcompress.checkpoint.atomic import overwrite_mode
    from sdcompress.lowrank.block_weights import BlockWeights
    from sdcompress.services.merge import LoraRef, MergeRequest, run_merge

    request = MergeRequest(
        models=list(models or []),
        output=output,
        loras=[LoraRef.parse(x) for x in lora or []],
        method=method,
        alpha=alpha,
        block_weights=BlockWeights.parse(block_weights) if block_weights is not None else None,
        density=density,
        seed=seed,
        rank=rank,
        format=fmt,
        dtype=resolve_dtype(dtype),
        overwrite=overwrite_mode(overwrite, overwrite_foreign),
        allow_pickle=allow_pickle,
        allow_nonfinite=allow_nonfinite,
        embeddings=list(embedding or []),
    )
    with progress_bar("merging", enabled=not json_) as progress:
        result = run_merge(request, progress)
    if json_:
        emit_json(result.__dict__)
        return
    for n in result.notes:
        note(n)
    success(f"wrote {result.output} ({result.kind}, {result.adapted_modules} modules adapted)")
