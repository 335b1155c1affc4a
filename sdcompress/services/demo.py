"""`demo`: the whole compression workflow on the built-in tiny SDXL-shaped teacher, offline.

It is the same service calls the commands make, in order: generate captioned
data, prune to the SSD-1B layout (importance-selected), distill briefly,
extract the distillation's change as a LoRA, convert the result to a single
file, a short LCM stage that makes the student a few-step model, benchmark
teacher against both students (seconds per image = steps needed / steps per
second), and end with the distilled student as an fp8 single file. Nothing here is special-cased: each step would work the same on a
full-size SDXL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcompress.checkpoint.atomic import Overwrite, replacing_dir
from sdcompress.training.config import TrainConfig

Report = Callable[[str], None]


@dataclass
class DemoRequest:
    output: str
    teacher: str = "tiny-sdxl"
    preset: str = "ssd-1b"
    images: int = 16
    steps: int = 30
    lcm_steps: int = 10  # 0: no LCM stage
    resolution: int = 64
    overwrite: bool | Overwrite = False


@dataclass
class DemoResult:
    output: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    losses_before: dict[str, float] = field(default_factory=dict)
    losses_after: dict[str, float] = field(default_factory=dict)
    speedup: float | None = None
    paths: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _short_run(work_dir: Path, steps: int) -> TrainConfig:
    """The demo's training settings: a few steps at batch 2, one checkpoint at the end."""
    return TrainConfig(
        work_dir=work_dir,
        max_steps=steps,
        batch_size=2,
        lr=1e-4,
        checkpoint_every=steps,
        keep_checkpoints=1,
        num_workers=0,
    )


def run_demo(req: DemoRequest, report: Report | None = None) -> DemoResult:
    """Run every step into `req.output`; an old demo folder there stays intact until the new one is done."""
    say = report or (lambda _msg: None)
    start = time.perf_counter()
    with replacing_dir(req.output, overwrite=req.overwrite) as root:
        return _run_steps(req, root, say, start)


def _run_steps(req: DemoRequest, root: Path, say: Report, start: float) -> DemoResult:
    from sdcompress.services.bench import BenchRequest, bench
    from sdcompress.services.convert import ConvertRequest, convert
    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.services.extract import ExtractRequest, run_extract
    from sdcompress.services.prune import PruneRequest, prune
    from sdcompress.services.quantize import QuantizeRequest, quantize
    from sdcompress.training.config import ConsistencyConfig
    from sdcompress.training.data import DataConfig
    from sdcompress.training.demo_data import write_demo_dataset

    paths = {
        "data": root / "data",
        "student": root / "student",
        "distilled": root / "distilled",
        "lora": root / "distill-delta.safetensors",
        "single_file": root / "distilled.safetensors",
        "lcm": root / "lcm",
        "fp8": root / "distilled-fp8.safetensors",
    }
    total = 8 if req.lcm_steps else 7

    say(f"1/{total} writing {req.images} captioned demo images")
    write_demo_dataset(paths["data"], req.images, size=req.resolution)

    say(f"2/{total} pruning {req.teacher} to the {req.preset} layout (importance-selected blocks)")
    pruned = prune(
        PruneRequest(
            teacher=req.teacher, output=str(paths["student"]), preset=req.preset, calibration_samples=4
        )
    )

    say(f"3/{total} distilling for {req.steps} steps")
    distilled = distill(
        DistillRequest(
            teacher=req.teacher,
            student=str(paths["student"]),
            output=paths["distilled"],
            data=DataConfig(data_dir=paths["data"], resolution=req.resolution),
            train=_short_run(root / "distill-work", req.steps),
        )
    )

    say(f"4/{total} extracting what distillation changed as a LoRA")
    lora = run_extract(
        ExtractRequest(base=str(paths["student"]), tuned=str(paths["distilled"]), output=str(paths["lora"]))
    )

    say(f"5/{total} converting the distilled pipeline to a single file")
    single = convert(ConvertRequest(src=str(paths["distilled"]), output=str(paths["single_file"])))

    models = [req.teacher, str(paths["distilled"])]
    if req.lcm_steps:
        say(f"6/{total} a {req.lcm_steps}-step LCM stage: the distilled student learns to sample in 4 steps")
        lcm = distill(
            DistillRequest(
                teacher=req.teacher,
                student=str(paths["distilled"]),
                output=paths["lcm"],
                data=DataConfig(data_dir=paths["data"], resolution=req.resolution),
                train=_short_run(root / "lcm-work", req.lcm_steps),
                consistency=ConsistencyConfig(objective="lcm"),
            )
        )
        models.append(str(lcm.output))
    else:
        paths.pop("lcm")

    say(
        f"{total - 1}/{total} benchmarking teacher vs students (seconds per image = steps needed / steps per s)"
    )
    measured = bench(
        BenchRequest(
            models=models,
            batch_sizes=(1,),
            resolution=req.resolution,
            steps=3,
            warmup=1,
            device="cpu",
        )
    )
    say(f"{total}/{total} quantizing the distilled student to fp8 (a ComfyUI / Forge single file)")
    fp8 = quantize(QuantizeRequest(str(paths["single_file"]), str(paths["fp8"]), "fp8", report=False))
    teacher_b, student_b = measured.models[:2]
    speedup = student_b.results[0].speedup if student_b.results else None

    rows = [
        {
            "model": f"teacher ({req.teacher})",
            "unet_parameters": pruned.parameters["teacher"],
            "transformer_blocks": pruned.transformer_blocks["teacher"],
            "steps_per_s": teacher_b.results[0].steps_per_s,
            "size_on_disk": teacher_b.size_on_disk,
        },
        {
            "model": f"student ({req.preset}, distilled)",
            "unet_parameters": pruned.parameters["student"],
            "transformer_blocks": pruned.transformer_blocks["student"],
            "steps_per_s": student_b.results[0].steps_per_s,
            "size_on_disk": student_b.size_on_disk,
        },
    ]
    if req.lcm_steps:
        lcm_b = measured.models[2]
        rows.append(
            {
                "model": f"few-step student ({req.preset}, distilled + LCM)",
                "unet_parameters": lcm_b.parameters,
                "transformer_blocks": pruned.transformer_blocks["student"],
                "steps_per_s": lcm_b.results[0].steps_per_s,
                "size_on_disk": lcm_b.size_on_disk,
            }
        )
    for row, measured_model in zip(rows, measured.models, strict=True):
        row["image_steps"] = measured_model.image_steps
        row["seconds_per_image"] = measured_model.results[0].seconds_per_image
    paths_out = {k: str(v) for k, v in paths.items()}
    paths_out["lora_modules"] = str(lora.modules)
    return DemoResult(
        output=str(root),
        rows=rows,
        losses_before=distilled.first_losses,
        losses_after=distilled.last_losses,
        speedup=speedup,
        paths={
            **paths_out,
            "single_file_bytes": str(single.bytes_written),
            "fp8_bytes": str(fp8.bytes_written),
        },
        seconds=time.perf_counter() - start,
    )
