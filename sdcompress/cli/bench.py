"""`sdcompress bench MODEL [MODEL ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sdcompress.choices import DType, Fp8Compute
from sdcompress.cli._options import DTYPE_METAVAR, AllowPickle, Device, Json, Overwrite, renamed
from sdcompress.cli._output import emit_json, human_bytes, human_count, note, success, table
from sdcompress.errors import SdcError

if TYPE_CHECKING:  # the service imports torch: the CLI loads it only when the command runs
    from sdcompress.services.bench import BenchResult


def _batch_sizes(text: str, flag: str = "--batch-sizes", example: str = "1,4,8") -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise SdcError(f"{flag} {text!r} is not a list of integers; use e.g. {example}.") from None
    return sizes


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _render(result: BenchResult) -> None:
    memory = "peak VRAM" if result.memory_kind == "cuda_max_allocated" else "peak RSS"
    table(
        f"Models ({result.device}, {result.dtype})",
        ["model", "family", "preset", "U-Net params", "on disk", "in memory"],
        [
            (
                m.ref,
                m.family,
                m.preset or "",
                human_count(m.parameters),
                human_bytes(m.size_on_disk) if m.size_on_disk is not None else "random",
                human_bytes(m.weights_bytes),
            )
            for m in result.models
        ],
        right=["U-Net params", "on disk", "in memory"],
    )
    rows = []
    for m in result.models:
        for r in m.results:
            rows.append(
                (
                    m.ref,
                    m.resolution,
                    f"{r.batch_size} ({r.unet_batch})",
                    r.error or _fmt(r.steps_per_s, ".3f"),
                    _fmt(r.images_per_s, ".3f"),
                    "-" if r.speedup is None else f"{r.speedup:.2f}x",
                    f"{_fmt(r.seconds_per_image, '.3g')} ({m.image_steps})",
                    human_bytes(r.peak_memory) if r.peak_memory is not None else "-",
                )
            )
    table(
        f"Denoising speed ({result.steps} steps after {result.warmup} warm-up, CFG {'on' if result.cfg else 'off'})",
        ["model", "px", "batch (U-Net)", "steps/s", "img/s", "speedup", "s/img (steps)", memory],
        rows,
        right=["px", "steps/s", "img/s", "speedup", "s/img (steps)", memory],
    )
    for n in result.notes:
        note(n)


def bench(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Models to measure; the first is the baseline. With --random-weights: families or presets "
            "(sdxl, ssd-1b, koala-700m, tiny-sd, bk-small, ...)."
        ),
    ],
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Images per step, comma-separated.")
    ] = "1,4,8",
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="Image size in pixels (default: the family's).")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed denoising steps per batch size.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps before timing.")] = 2,
    device: Device = "auto",
    dtype: Annotated[
        DType | None,
        typer.Option(
            "--dtype",
            parser=DType.cli,
            metavar=DTYPE_METAVAR,
            help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU).",
        ),
    ] = None,
    cfg: Annotated[
        bool,
        typer.Option(
            "--cfg/--no-cfg", help="Double the U-Net batch for classifier-free guidance, as pipelines do."
        ),
    ] = True,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights", help="Measure architectures (family or preset names) without weights."
        ),
    ] = False,
    family: Annotated[
        str | None,
        typer.Option(
            "--family", help="With --random-weights: the family presets apply to (e.g. sd2, tiny-sd)."
        ),
    ] = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", hidden=True, help="Deprecated name of --family.")
    ] = None,
    image_steps: Annotated[
        str | None,
        typer.Option(
            "--image-steps",
            help="Denoising steps one image needs, per model (e.g. 50,50,4; one value: all). Default: 4 for "
            "a model shipped with LCMScheduler, else 50. s/img = steps/img / (steps/s x batch).",
        ),
    ] = None,
    fp8_compute: Annotated[
        Fp8Compute,
        typer.Option(
            "--fp8-compute",
            parser=Fp8Compute.cli,
            metavar="auto|matmul|cast-up",
            help="An fp8 file's Linear layers: multiplied in fp8 (torch._scaled_mm) or cast up per layer. "
            "auto: fp8 matmuls on a CUDA GPU that has them (compute capability 8.9+), else cast up.",
        ),
    ] = Fp8Compute.AUTO,
    plot_path: Annotated[
        str | None, typer.Option("--plot", help="Also draw a bar chart of steps/s to this PNG file.")
    ] = None,
    overwrite: Overwrite = False,
    json_: Json = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Measure U-Net parameters, size, peak memory and denoising steps/s; speedup against the first model."""
    if plot_path is not None:
        from sdcompress.checkpoint.atomic import check_output

        check_output(plot_path, overwrite=overwrite)  # fail before measuring, not after
    from sdcompress.services.bench import BenchRequest, plot
    from sdcompress.services.bench import bench as run_bench

    req = BenchRequest(
        models=list(models),
        batch_sizes=_batch_sizes(batch_sizes),
        resolution=resolution,
        steps=steps,
        warmup=warmup,
        device=device,
        dtype=dtype,
        cfg=cfg,
        random_weights=random_weights,
        family=renamed(family, teacher, new="--family", old="--teacher"),
        allow_pickle=allow_pickle,
        image_steps=_batch_sizes(image_steps, "--image-steps", "50,50,4") if image_steps else (),
        fp8_compute=fp8_compute,
    )
    result = run_bench(req, on_progress=None if json_ else note)
    if plot_path is not None:
        plot(result, Path(plot_path), overwrite=overwrite)
    if json_:
        emit_json(result.to_dict())
        return
    _render(result)
    if plot_path is not None:
        success(f"wrote {plot_path}")
