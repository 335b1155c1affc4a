"""`sdcompress eval MODEL [MODEL ...] --prompts FILE|coco:N --teacher REF`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sdcompress.choices import DType, EvalMetric, Sampler
from sdcompress.cli._options import DTYPE_METAVAR, AllowPickle, Device, Json
from sdcompress.cli._output import emit_json, note, success, table
from sdcompress.errors import SdcError
from sdcompress.evaluation.protocol import DEFAULT_CLIP_MODEL, FID_RESOLUTION

if TYPE_CHECKING:  # the service imports torch: the CLI loads it only when the command runs
    from sdcompress.services.eval import EvalResult


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


def _render(result: EvalResult) -> None:
    rows = []
    for m in result.models:
        a = m.agreement or {}
        rows.append(
            (
                m.ref + (" (teacher)" if m.teacher else ""),
                m.preset or m.family,
                _fmt(a.get("latent_mse"), ".4g"),
                _fmt(a.get("psnr"), ".2f"),
                _fmt(a.get("ssim"), ".4f"),
                _fmt(m.clip_score, ".4f"),
                _fmt(m.fid, ".2f"),
                _fmt(m.seconds_per_image, ".3g"),
                f"{m.generated}/{m.cached}",
            )
        )
    settings = result.settings
    table(
        f"{result.prompts} prompts, {settings['steps']} steps, guidance {settings['guidance']}, "
        f"{settings['scheduler']} scheduler, {settings['dtype']} on {settings['device']}",
        ["model", "preset", "latent MSE", "PSNR dB", "SSIM", "CLIP", "FID", "s/img", "new/cached"],
        rows,
        right=["latent MSE", "PSNR dB", "SSIM", "CLIP", "FID", "s/img", "new/cached"],
    )
    for n in result.notes:
        note(n)
    success(
        f"wrote {Path(result.output) / 'eval.json'} and {result.grid}"
        + (f", {result.plot}" if result.plot else "")
    )


def default_output(models: list[str]) -> Path:
    """MODEL.eval beside the first model when it is a path (where `push` finds it), else ./eval."""
    first = Path(models[0]).expanduser() if models else None
    if first is not None and first.exists():
        return first.with_name(first.name + ".eval")
    return Path("eval")


def eval_models(
    models: Annotated[list[str], typer.Argument(help="Models to score (folders, files, hub ids, tiny-sd).")],
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts", help="A text file with one prompt a line, or coco:N (needs --coco-captions)."
        ),
    ],
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher", help="The reference model; rendered too, listed first. Needed for agreement."
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
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps per image.")] = 25,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 7.5,
    scheduler: Annotated[
        Sampler, typer.Option("--scheduler", help="Scheduler for every model (model: each model's own).")
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
