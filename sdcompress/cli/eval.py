"""`sdcompress eval MODEL [MODEL ...] --prompts FILE|coco:N --teacher REF`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sdcompress.choices import DType, EvalMetric, Sampler
from sdcompress.cli._options import DTYPE_METAVAR, AllowPickle, Device, Json
from sdcompress.cli._output import emit_json, note, success, table
from sdcompress.errors import SdcError
from sdcompress.evaluation.protocol import DEFAULT_CLIP_MODEL, FID_RESOLUTION

if TYPE_CHECKING:  # the service imports torch: the CLI loads it only when the command runs
    from sdcompress.services.eval import EvalResult, ModelEval


def _metrics(text: str) -> tuple[EvalMetric, ...]:
    names = [x for x in text.replace(" ", "").split(",") if x]
    if not names:
        raise SdcError(f"--metrics is empty; use some of {EvalMetric.values()}.")
    return tuple(EvalMetric.parse(n, "--metrics") for n in names)


def _fmt(value: object, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def _sampling(m: ModelEval) -> str:
    """`4 x LCM, g 0`: steps, scheduler class (without "Scheduler") and guidance of one model."""
    if m.steps is None:
        return "-"
    return f"{m.steps} x {(m.scheduler or '').removesuffix('Scheduler')}, g {m.guidance:g}"


def _render(result: EvalResult) -> None:
    """One row per model; CLIP, FID and bench columns only when some model has a figure for them."""
    columns: list[tuple[str, Callable[[ModelEval], str]]] = [
        ("latent MSE", lambda m: _fmt((m.agreement or {}).get("latent_mse"), ".4g")),
        ("PSNR dB", lambda m: _fmt((m.agreement or {}).get("psnr"), ".2f")),
        ("SSIM", lambda m: _fmt((m.agreement or {}).get("ssim"), ".4f")),
        ("CLIP", lambda m: _fmt(m.clip_score, ".4f")),
        ("FID", lambda m: _fmt(m.fid, ".2f")),
        ("s/img", lambda m: _fmt(m.render_seconds_per_image, ".3g")),
        ("bench s/img", lambda m: _fmt(m.seconds_per_image, ".3g")),
    ]
    optional = {"CLIP": "clip_score", "FID": "fid", "bench s/img": "seconds_per_image"}
    columns = [
        (name, cell)
        for name, cell in columns
        if name not in optional or any(getattr(m, optional[name]) is not None for m in result.models)
    ]
    rows = [
        (
            m.ref + (" (teacher)" if m.teacher else ""),
            m.preset or m.family,
            _sampling(m),
            *(cell(m) for _, cell in columns),
            f"{m.generated}/{m.cached}",
        )
        for m in result.models
    ]
    settings = result.settings
    numbers = [name for name, _ in columns]
    table(
        f"{result.prompts} prompts, {settings['dtype']} on {settings['device']} "
        "(s/img: this pipeline, prompt to decoded image)",
        ["model", "preset", "sampling", *numbers, "new/cached"],
        rows,
        right=[*numbers, "new/cached"],
    )
    for n in result.notes:
        note(n)
    success(
        f"wrote {Path(result.output) / 'eval.json'} and {result.grid}"
        + (f", {result.plot}" if result.plot else "")
    )


def default_output(models: list[str]) -> Path:
    """MODEL.eval beside the first model when it is a path (where `push` finds it), else ./eval."""
    from sdcompress.evaluation.sampling import parse_model_spec

    first = Path(parse_model_spec(models[0]).ref).expanduser() if models else None
    if first is not None and first.exists():
        return first.with_name(first.name + ".eval")
    return Path("eval")


def eval_models(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Models to score (folders, files, hub ids, tiny-sd); MODEL@steps=4,guidance=0,scheduler=tcd "
            "sets one model's sampling (any of the keys; beats its run record and the flags)."
        ),
    ],
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts", help="A text file with one prompt a line, or coco:N (needs --coco-captions)."
        ),
    ],
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help="The reference model; rendered too, listed first. Needed for agreement. REF@steps=50 works here too.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Eval folder: images (reused on reruns), eval.json, grid.png. Default: MODEL.eval (push reads it).",
        ),
    ] = None,
    coco_captions: Annotated[
        Path | None,
        typer.Option("--coco-captions", help="COCO's captions_val2014.json, for --prompts coco:N."),
    ] = None,
    steps: Annotated[
        int,
        typer.Option(
            "--steps",
            help="Denoising steps for the teacher and every model without its own (a run record's, LCM's 4).",
        ),
    ] = 25,
    guidance: Annotated[
        float,
        typer.Option(
            "--guidance",
            help="Classifier-free guidance scale for models without a recorded one (an LCM student takes "
            "it through its guidance embedding).",
        ),
    ] = 7.5,
    scheduler: Annotated[
        Sampler,
        typer.Option(
            "--scheduler",
            help="Scheduler for models without their own sampling (model: each model's own scheduler).",
        ),
    ] = Sampler.MODEL,
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="Image size in pixels (default: the family's).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Prompt i is rendered with seed SEED + i.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per pipeline call.")] = 4,
    device: Device = "auto",
    dtype: Annotated[
        DType | None,
        typer.Option(
            "--dtype", parser=DType.cli, metavar=DTYPE_METAVAR, help="Default: fp16 on CUDA, fp32 on CPU."
        ),
    ] = None,
    metrics: Annotated[
        str, typer.Option("--metrics", help=f"Comma-separated: {EvalMetric.values()}.")
    ] = "agreement",
    clip_model: Annotated[
        str, typer.Option("--clip-model", help="transformers CLIP folder or hub id for --metrics clip.")
    ] = DEFAULT_CLIP_MODEL,
    fid_model: Annotated[
        str | None,
        typer.Option(
            "--fid-model", help="TorchScript Inception (inception-2015-12-05.pt): a path or owner/repo/file."
        ),
    ] = None,
    fid_reference: Annotated[
        Path | None, typer.Option("--fid-reference", help="Folder of real images FID compares against.")
    ] = None,
    fid_resolution: Annotated[
        int, typer.Option("--fid-resolution", help="Both image sets are resized to this before FID.")
    ] = FID_RESOLUTION,
    grid_prompts: Annotated[int, typer.Option("--grid-prompts", help="Prompts (rows) in grid.png.")] = 8,
    bench: Annotated[
        Path | None,
        typer.Option(
            "--bench", help="`sdcompress bench --json` output: adds seconds per image and the plot."
        ),
    ] = None,
    json_: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Score models against a teacher on the same prompts and seeds: agreement, CLIP score, FID, a grid."""
    from sdcompress.services.eval import EvalRequest, evaluate

    request = EvalRequest(
        models=list(models),
        prompts=prompts,
        output=output or default_output(models),
        teacher=teacher,
        coco_captions=coco_captions,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        resolution=resolution,
        seed=seed,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        metrics=_metrics(metrics),
        clip_model=clip_model,
        fid_model=fid_model,
        fid_reference=fid_reference,
        fid_resolution=fid_resolution,
        grid_prompts=grid_prompts,
        bench=bench,
        allow_pickle=allow_pickle,
    )
    result = evaluate(request, on_progress=None if json_ else note)
    if json_:
        emit_json(result.to_dict())
        return
    _render(result)
