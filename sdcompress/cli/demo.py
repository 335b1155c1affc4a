"""`sdcompress demo`."""

from __future__ import annotations

from typing import Annotated

import typer

from sdcompress.cli._options import Json, Overwrite, OverwriteForeign
from sdcompress.cli._output import emit_json, human_bytes, human_count, note, out, success, table


def demo(
    output: Annotated[
        str, typer.Option("--output", "-o", help="Folder for everything the demo writes.")
    ] = "sdcompress-demo",
    steps: Annotated[int, typer.Option("--steps", help="Distillation steps.")] = 30,
    lcm_steps: Annotated[
        int, typer.Option("--lcm-steps", help="Steps of the LCM stage that follows (0: none).")
    ] = 10,
    overwrite: Overwrite = False,
    overwrite_foreign: OverwriteForeign = False,
    json_: Json = False,
) -> None:
    """Run prune -> distill -> extract-lora -> convert -> LCM -> bench -> fp8 on the built-in tiny SDXL-shaped model, offline."""
    from dataclasses import asdict

    from sdcompress.checkpoint.atomic import overwrite_mode
    from sdcompress.services.demo import DemoRequest, run_demo

    request = DemoRequest(
        output=output,
        steps=steps,
        lcm_steps=lcm_steps,
        overwrite=overwrite_mode(overwrite, overwrite_foreign),
    )
    result = run_demo(request, report=None if json_ else note)
    if json_:
        emit_json(asdict(result))
        return
    table(
        "sdcompress demo",
        ["model", "U-Net parameters", "transformer blocks", "steps/s", "s/img (steps)", "size on disk"],
        [
            (
                r["model"],
                human_count(r["unet_parameters"]),
                r["transformer_blocks"],
                f"{r['steps_per_s']:.2f}" if r["steps_per_s"] else "-",
                f"{r['seconds_per_image']:.3g} ({r['image_steps']})" if r["seconds_per_image"] else "-",
                human_bytes(r["size_on_disk"]) if r["size_on_disk"] else "-",
            )
            for r in result.rows
        ],
        right=["U-Net parameters", "transformer blocks", "steps/s", "s/img (steps)", "size on disk"],
    )
    table(
        "distillation loss (first step -> last step)",
        ["term", "before", "after"],
        [
            (k, f"{v:.4f}", f"{result.losses_after.get(k, float('nan')):.4f}")
            for k, v in result.losses_before.items()
        ],
        right=["before", "after"],
    )
    if result.speedup:
        out.print(f"student speedup over teacher: [bold]{result.speedup:.2f}x[/bold] (batch 1, CPU)")
    for name in ("data", "student", "distilled", "lora", "single_file", "lcm", "fp8"):
        if name in result.paths:
            out.print(f"  {name:12} {result.paths[name]}")
    success(f"demo finished in {result.seconds:.0f} s")
