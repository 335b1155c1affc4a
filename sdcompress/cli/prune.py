"""`sdcompress prune --teacher REF (--preset P | surgery options) -o OUT`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sdcompress.cli._options import AllowPickle, Device, Json, Output, Overwrite, OverwriteForeign
from sdcompress.cli._output import emit_json, err, human_bytes, human_count, note, out, success, table

if TYPE_CHECKING:  # these import torch: the CLI loads them only when the command runs
    from sdcompress.checkpoint.tensors import LazyTensor
    from sdcompress.prune.importance import ScoringPlan


LINE_EVERY_S = 15.0  # progress lines when stderr is not a terminal (a log file, CI)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} hours"


def _flops(n: float) -> str:
    return f"{n / 1e12:.1f} TFLOPs" if n >= 1e12 else f"{n / 1e9:.1f} GFLOPs"


def announce(plan: ScoringPlan) -> None:
    """Say what scoring costs before it starts and, when a CPU has GPU work, how to make it cheaper."""
    from sdcompress.prune.importance import CPU_FLOPS_PER_SECOND

    what = "importance scoring" if plan.blocks else "measuring the student"
    parts = [f"a reference and {plan.blocks} with one block skipped each"] if plan.blocks else []
    if plan.passes > (plan.blocks + 1 if plan.blocks else 0):
        parts.append("teacher and student on held-out inputs")
    err.print(
        f"{what}: {plan.passes} U-Net passes ({'; '.join(parts)})"
        f" x {plan.samples} samples at {plan.size} px ({plan.latent}x{plan.latent} latents) = "
        f"{plan.forwards} forwards, {_flops(plan.flops)} on {plan.device}"
        + (" (calibration defaults for this device)" if plan.defaulted else ""),
        highlight=False,
        soft_wrap=True,
    )
    if plan.gpu_work:
        err.print(
            f"[yellow]this is GPU work:[/yellow] about {_duration(plan.flops / CPU_FLOPS_PER_SECOND)} on a CPU. "
            "Run it where CUDA is available, or make it cheaper: a smaller --calibration-size "
            f"(now {plan.size}), fewer --calibration-samples (now {plan.samples}), or --select uniform "
            "(evenly spaced blocks, no scoring).",
            highlight=False,
            soft_wrap=True,
        )


class StageProgress:
    """The service's (stage, done, total) events on stderr.

    On a terminal: a rich bar with elapsed time and ETA. Otherwise (a log file, CI) rich draws
    nothing until the end, so a plain line is printed when a stage starts and every
    LINE_EVERY_S seconds, with the ETA of the stage so far.
    """

    def __init__(self, enabled: bool) -> None:
        self.lines = enabled and not err.is_terminal
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not enabled or self.lines,
        )
        self.task = self.bar.add_task("pruning", total=None)
        self.stage, self.stage_start, self.last_line = "", 0.0, 0.0

    def __enter__(self) -> StageProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.stage_start, self.last_line = stage, now, 0.0
            self.bar.reset(self.task, description=stage, total=total)
        self.bar.update(self.task, completed=done, total=total)
        if self.lines and (self.last_line == 0.0 or now - self.last_line >= LINE_EVERY_S):
            self.last_line = now
            err.print(f"{stage}: {_status(done, total, now - self.stage_start)}", highlight=False)


def _status(done: int, total: int | None, elapsed: float) -> str:
    if not total:
        return f"{done}" if done else "started"
    line = f"{done}/{total} ({100 * done / total:.0f}%), {_duration(elapsed)} elapsed"
    if 0 < done < total:
        line += f", about {_duration(elapsed * (total - done) / done)} left"
    return line


def _render(result) -> None:
    out.print(
        f"[bold]{result.teacher}[/bold] -> [bold]{result.output}[/bold]"
        + (f" (preset [cyan]{result.preset}[/cyan])" if result.preset else "")
        + f", selection {result.select}"
    )
    table(
        "U-Net parameters",
        ["stage", "teacher", "student"],
        [(s["stage"], human_count(s["teacher"]), human_count(s["student"])) for s in result.stages]
        + [("total", human_count(result.parameters["teacher"]), human_count(result.parameters["student"]))],
        right=["teacher", "student"],
    )
    tb, fl = result.transformer_blocks, result.flops_per_step
    table(
        "Summary",
        ["", "teacher", "student"],
        [
            ("transformer blocks", tb["teacher"], tb["student"]),
            (
                f"GFLOPs per step ({result.resolution} px, batch 1)",
                f"{fl['teacher'] / 1e9:,.1f}",
                f"{fl['student'] / 1e9:,.1f}",
            ),
        ],
        right=["teacher", "student"],
    )
    selected = [r for r in result.removed if r["reason"] == "selection"]
    if selected:
        table(
            f"Removed transformer blocks ({len(selected)} selected, {len(result.removed) - len(selected)} with their layers)",
            ["block", "score (MSE when skipped)"],
            [(r["block"], "" if r["score"] is None else f"{r['score']:.4g}") for r in selected],
            right=["score (MSE when skipped)"],
        )
    if result.init_mse is not None:
        out.print(
            f"student vs teacher MSE at initialisation (held-out calibration set): {result.init_mse:.4g}"
        )
    success(
        f"wrote {result.output} ({human_bytes(result.size_on_disk)} on disk, U-Net {human_bytes(result.unet_bytes)}, "
        f"{result.seconds:.1f} s)"
    )
    for n in result.notes:
        note(n)


def prune(
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher",
            "-t",
            help="Teacher: folder, .safetensors file, hub id or alias (SD15, SDXL), tiny-sd.",
        ),
    ],
    output: Output,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="Published layout: bk-base, bk-small, bk-tiny (SD 1.x/2.x); ssd-1b, vega, koala-1b, koala-700m (SDXL).",
        ),
    ] = None,
    drop_transformer_blocks: Annotated[
        int | None,
        typer.Option(
            "--drop-transformer-blocks",
            help="Remove N transformer blocks across all attention stacks (chosen by --select).",
        ),
    ] = None,
    layers_per_block: Annotated[
        int | None,
        typer.Option(
            "--layers-per-block",
            help="Resnets per down level (1 as BK-SDM and KOALA; up levels keep teacher resnets 0 and 2).",
        ),
    ] = None,
    mid_block: Annotated[
        str | None,
        typer.Option("--mid-block", help="keep, resnet (one resnet, no attention, as SSD-1B) or none."),
    ] = None,
    depths: Annotated[
        str | None,
        typer.Option(
            "--depths",
            help='Transformer depth per level by hand, e.g. "down2=4,4 up0=4,4,10 up1=2,1,1" (one depth per resnet; '
            "one number sets the whole level; 0 removes a level's attention; mid=0 keeps one mid resnet).",
        ),
    ] = None,
    select: Annotated[
        str,
        typer.Option(
            "--select", help="importance (measured on the teacher), uniform (evenly spaced) or last."
        ),
    ] = "importance",
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts", help="Text file, one calibration prompt per line (default: built-in list)."
        ),
    ] = None,
    calibration_samples: Annotated[
        int | None,
        typer.Option(
            "--calibration-samples", help="Noisy latents to score on (default: 8 on a GPU, 4 on a CPU)."
        ),
    ] = None,
    calibration_size: Annotated[
        int | None,
        typer.Option(
            "--calibration-size",
            help="Calibration image size in pixels (default: the family's resolution on a GPU; on a CPU "
            "smaller, down to a quarter of it, to keep scoring of a small model within seconds).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration batch size.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration inputs.")] = 0,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--evaluate", help="Measure the student's MSE to the teacher at initialisation (held-out inputs)."
        ),
    ] = False,
    unet_only: Annotated[
        bool, typer.Option("--unet-only", help="Write only the student U-Net folder.")
    ] = False,
    device: Device = "auto",
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    allow_pickle: AllowPickle = False,
    json_: Json = False,
) -> None:
    """Prune a teacher U-Net into a student: a published layout or your own, initialised from the teacher.

    Writes a diffusers pipeline (student U-Net with the teacher's VAE, text encoders, tokenizers and
    scheduler) or with --unet-only the U-Net alone, plus sdcompress_prune.json recording what was cut.
    """
    from sdcompress.checkpoint.atomic import overwrite_mode
    from sdcompress.services.prune import PruneRequest
    from sdcompress.services.prune import prune as run_prune

    req = PruneRequest(
        teacher=teacher,
        output=output,
        preset=preset,
        drop_transformer_blocks=drop_transformer_blocks,
        layers_per_block=layers_per_block,
        mid_block=mid_block,
        depths=depths,
        select=select,
        prompts=prompts,
        calibration_samples=calibration_samples,
        calibration_size=calibration_size,
        batch_size=batch_size,
        seed=seed,
        device=device,
        evaluate=evaluate,
        unet_only=unet_only,
        overwrite=overwrite_mode(overwrite, overwrite_foreign),
        allow_pickle=allow_pickle,
    )
    with StageProgress(enabled=not json_) as progress:
        written = 0

        def on_tensor(_name: str, _tensor: LazyTensor) -> None:
            nonlocal written
            written += 1
            progress("writing the student", written, None)

        result = run_prune(req, progress=progress, on_tensor=on_tensor, on_plan=announce)
    if json_:
        emit_json(result.to_dict())
        return
    _render(result)
