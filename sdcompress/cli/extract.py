"""`sdcompress extract-lora BASE TUNED -o OUT`."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from sdcompress.choices import DType, LoraOutputs, RankMode
from sdcompress.cli._lowrank_progress import progress_bar
from sdcompress.cli._options import (
    DTYPE_METAVAR,
    AllowPickle,
    Device,
    Json,
    Output,
    Overwrite,
    OverwriteForeign,
)
from sdcompress.cli._output import emit_json, human_bytes, note, out, success, table
from sdcompress.lowrank.rank_defaults import BUDGET_RANK_CAP, DEFAULT_RANK


def extract_lora(
    base: Annotated[str, typer.Argument(help="The original model (folder, .safetensors, hub id, tiny-sd).")],
    tuned: Annotated[str, typer.Argument(help="The fine-tuned model, same architecture as BASE.")],
    output: Output = ...,  # type: ignore[assignment]
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank", help=f"Rank (default {DEFAULT_RANK}); the largest rank with --mode or --size-budget."
        ),
    ] = None,
    conv_rank: Annotated[
        int | None,
        typer.Option("--conv-rank", help="Also extract 3x3 convs (resnets, samplers) at this rank."),
    ] = None,
    mode: Annotated[
        RankMode,
        typer.Option("--mode", help=f"How ranks are chosen (--rank caps them at {BUDGET_RANK_CAP})."),
    ] = RankMode.FIXED,
    mode_param: Annotated[
        float | None,
        typer.Option(
            "--mode-param", help="ratio: keep sv >= p*max; energy: keep share p; threshold: keep sv > p."
        ),
    ] = None,
    size_budget: Annotated[
        str | None,
        typer.Option(
            "--size-budget", help="Target file size (e.g. 50MB): ranks chosen jointly for least error."
        ),
    ] = None,
    no_text_encoder: Annotated[
        bool, typer.Option("--no-text-encoder", help="Leave the text encoders out.")
    ] = False,
    clamp_quantile: Annotated[
        float | None,
        typer.Option("--clamp-quantile", help="Clamp factors to this quantile (kohya's 0.99); off."),
    ] = None,
    fmt: Annotated[
        LoraOutputs,
        typer.Option(
            "--format",
            parser=LoraOutputs.cli,
            help="kohya, peft, or both: kohya,peft (the PEFT copy goes to OUT.peft.safetensors).",
        ),
    ] = LoraOutputs.KOHYA,
    dtype: Annotated[
        DType,
        typer.Option("--dtype", parser=DType.cli, metavar=DTYPE_METAVAR, help="Dtype of the LoRA file."),
    ] = DType.FP16,
    device: Device = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD.")] = 0,
    json_: Json = False,
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Extract a LoRA from the difference between a fine-tuned model and its base."""
    # These load torch: imported when the command runs, so --help and usage errors stay fast.
    from sdcompress.checkpoint.atomic import overwrite_mode
    from sdcompress.devices import resolve_device
    from sdcompress.lowrank.extract import ExtractOptions
    from sdcompress.lowrank.rank import parse_size
    from sdcompress.services.extract import ExtractRequest, run_extract

    options = ExtractOptions(
        rank=rank,
        conv_rank=conv_rank,
        mode=mode,
        mode_param=mode_param,
        size_budget=parse_size(size_budget) if size_budget else None,
        text_encoder=not no_text_encoder,
        clamp_quantile=clamp_quantile,
        device=str(resolve_device(device)),
        dtype=dtype.torch(),
        seed=seed,
    )
    policy = overwrite_mode(overwrite, overwrite_foreign)
    request = ExtractRequest(base, tuned, output, options, fmt, policy, allow_pickle)
    with progress_bar("extracting", enabled=not json_) as progress:
        result = run_extract(request, progress)
    if json_:
        data = dataclasses.asdict(result)
        data["layers"] = [
            {
                "module": f"{x.target.component}.{x.target.path}",
                "shape": list(x.shape),
                "rank": x.rank,
                "clamped": x.clamped,
                "rel_error": x.rel_error,
                "retained": x.retained,
            }
            for x in result.layers
        ]
        emit_json(data)
        return
    table(
        "Per block",
        ["block", "layers", "rank mean/max", "rel. error", "retained"],
        [
            (
                b.block,
                b.layers,
                f"{b.mean_rank:.1f}/{b.max_rank}",
                f"{b.rel_error:.4f}",
                f"{b.retained:.2%}",
            )
            for b in result.blocks
        ],
        right=["layers", "rank mean/max", "rel. error", "retained"],
    )
    if result.clamped:
        note(f"rank clamped to the layer size for {len(result.clamped)} layers (e.g. {result.clamped[0]})")
    if result.unchanged:
        note(f"{result.unchanged} layers are identical in both models and were left out")
    out.print(
        f"{result.modules} modules, relative error {result.rel_error:.4f}, retained energy {result.retained:.2%}, "
        f"{human_bytes(result.file_bytes)} ({result.format}, {result.family})"
    )
    success(f"wrote {', '.join(result.files)}")
