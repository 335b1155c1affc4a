"""`sdcompress extract-lora BASE TUNED -o OUT`."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from sdcompress.cli._lowrank_progress import progress_bar
from sdcompress.cli._options import AllowPickle, Device, Json, Output, Overwrite, OverwriteForeign
from sdcompress.cli._output import emit_json, human_bytes, note, out, success, table
from sdcompress.devices import DTYPES, resolve_device
from sdcompress.errors import SdcError
from sdcompress.lowrank.extract import BUDGET_RANK_CAP, DEFAULT_RANK, ExtractOptions
from sdcompress.lowrank.rank import parse_size
from sdcompress.services.extract import ExtractRequest, run_extract


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
    mode: Annotated[str, typer.Option("--mode", help="fixed, ratio, energy or threshold.")] = "fixed",
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
    fmt: Annotated[str, typer.Option("--format", help="kohya (A1111/ComfyUI/diffusers) or peft.")] = "kohya",
    dtype: Annotated[str, typer.Option("--dtype", help="fp16, bf16 or fp32.")] = "fp16",
    device: Device = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD.")] = 0,
    json_: Json = False,
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Extract a LoRA from the difference between a fine-tuned model and its base."""
    if dtype not in DTYPES:
        raise SdcError(f"--dtype {dtype} is not one of fp16, bf16, fp32.")
    if fmt not in ("kohya", "peft"):
        raise SdcError(f"--format {fmt} is not one of kohya, peft.")
    if mode not in ("fixed", "ratio", "energy", "threshold"):
        raise SdcError(f"--mode {mode} is not one of fixed, ratio, energy, threshold.")
    budget = parse_size(size_budget) if size_budget else None
    default_rank = BUDGET_RANK_CAP if budget is not None or mode != "fixed" else DEFAULT_RANK
    r = rank if rank is not None else default_rank
    if r < 1 or (conv_rank is not None and conv_rank < 1):
        raise SdcError("--rank and --conv-rank must be at least 1.")
    options = ExtractOptions(
        rank=r,
        conv_rank=conv_rank,
        mode=mode,
        mode_param=mode_param,
        size_budget=budget,
        text_encoder=not no_text_encoder,
        clamp_quantile=clamp_quantile,
        device=str(resolve_device(device)),
        dtype=DTYPES[dtype],
        seed=seed,
    )
    request = ExtractRequest(base, tuned, output, options, fmt, overwrite, allow_pickle)
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
    success(f"wrote {result.output}")
