"""Few-step students side by side: LCM and DMD2 (LoRA, pruned full) at 4 steps against the teacher at 50.

Issue 18's tiny-model acceptance line, offline on the CPU:

1. the teacher: tiny-sdxl fine-tuned on the generated shapes data (benchmarks/lcm.py's `train_teacher`;
   a random teacher's ODE carries nowhere, so nothing could move toward its 50-step images);
2. students from it: LCM (issue 12: the full teacher with the guidance embedding), DMD2 as a LoRA on the
   teacher (`--lora RANK`), and DMD2 into a pruned tiny-sdxl (`prune --preset ssd-1b`, full student);
3. fixed prompts and seeds, the same initial noise for every sampler; the reference is the teacher at
   50 steps with its own scheduler, guided. Each student is compared with its own initialisation
   (the "untrained" student: the teacher for LCM and the LoRA, the prune output for the pruned one)
   under the same sampler, steps, guidance and noise.

Two samplers per student. The saved one (LCMScheduler: the student's x0 estimate, then *fresh* noise
to the next timestep) is what the outputs ship with; its 4-step image is another sample of the
distribution, not the end of the seed's own trajectory, so per-seed distances mix model and noise.
TCD with eta (gamma) 0 on the same timesteps re-noises each jump with the model's own noise estimate:
deterministic, the one whose images can be compared seed by seed (benchmarks/lcm.py found the same).
The untrained LCM student is the teacher unguided: the added guidance embedding starts at zero.

Printed per sampler: latent MSE to the reference, PSNR of the decoded images, and in how many of the
prompt x seed samples the trained student is closer (latent MSE) than its initialisation.

    OMP_NUM_THREADS=1 python benchmarks/few_step.py                      # defaults: see --help
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lcm import PROMPTS, sample, train_teacher, with_scheduler  # noqa: E402
from lcm import train as train_lcm  # noqa: E402

MODEL = "tiny-sdxl"


@dataclass
class DmdRun:
    """One DMD2 student: its initialisation (None: the teacher) and its training settings."""

    name: str
    student: str | None
    lora: int | None
    lr: float
    steps: int
    guidance: float
    fake_updates: int
    fake_lr: float | None
    batch_size: int
    seed: int = 0
    losses: dict[str, float] = field(default_factory=dict)


def train_dmd2(work: Path, teacher: str, data: Path, run: DmdRun, resolution: int) -> Path:
    """`distill --objective dmd2` from `teacher` into `run.student`; the output folder."""
    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.training.config import ConsistencyConfig, DmdConfig
    from sdcompress.training.data import DataConfig
    from sdcompress.training.engine import TrainConfig

    out = work / run.name
    request = DistillRequest(
        teacher=teacher,
        student=run.student,
        output=out,
        data=DataConfig(data_dir=data, resolution=resolution),
        train=TrainConfig(
            work_dir=work / f"{run.name}.train",
            max_steps=run.steps,
            batch_size=run.batch_size,
            lr=run.lr,
            checkpoint_every=0,
            cpu=True,
            seed=run.seed,
        ),
        save_dtype="fp32",
        consistency=ConsistencyConfig(objective="dmd2", lora=run.lora),
        dmd=DmdConfig(
            student_steps="4",
            teacher_guidance=run.guidance,
            fake_updates=run.fake_updates,
            fake_lr=run.fake_lr,
        ),
    )
    started = time.perf_counter()
    result = distill(request)
    losses = {k: (result.first_losses[k], result.last_losses[k]) for k in ("dm", "fake_denoise")}
    if not all(abs(v) < float("inf") for pair in losses.values() for v in pair):
        raise SystemExit(f"{run.name}: non-finite losses {losses}")
    run.losses = {"dm_first": losses["dm"][0], "dm_last": losses["dm"][1]}
    print(
        f"{run.name}: {result.steps} DMD2 steps ({run.fake_updates} fake updates each) in "
        f"{time.perf_counter() - started:.0f} s; dm loss {losses['dm'][0]:.4g} -> {losses['dm'][1]:.4g}, "
        f"fake denoising {losses['fake_denoise'][0]:.4g} -> {losses['fake_denoise'][1]:.4g}"
    )
    return out


def prune_teacher(work: Path, teacher: str) -> str:
    """The pruned student's initialisation: SSD-1B's layout on the fine-tuned teacher (uniform selection)."""
    from sdcompress.services.prune import PruneRequest, prune

    out = work / "pruned"
    result = prune(
        PruneRequest(teacher=teacher, output=str(out), preset="ssd-1b", select="uniform", device="cpu")
    )
    print(
        f"pruned student: {result.parameters['student'] / 1e6:.2f}M of {result.parameters['teacher'] / 1e6:.2f}M "
        f"U-Net parameters, {result.transformer_blocks['student']} of {result.transformer_blocks['teacher']} "
        "transformer blocks"
    )
    return str(out)


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


@dataclass
class Row:
    """One sampler: a pipeline, its step count and guidance, the timesteps it must run, a fresh-noise seed."""

    pipe: object
    steps: int
    guidance: float
    timesteps: list[int] | None = None
    stochastic: bool = False
    pair: str | None = None  # the untrained row this trained row is compared with


def with_sampler(pipe, scheduler):
    """The same pipeline (shared modules) sampling with `scheduler`."""
    return type(pipe)(**{**pipe.components, "scheduler": scheduler})


def student_rows(name: str, trained, untrained, guidance: float, untrained_guidance: float) -> dict[str, Row]:
    """Trained and untrained student under its saved LCMScheduler and under TCD eta 0 on its timesteps."""
    from diffusers import TCDScheduler

    saved = trained.scheduler
    saved.set_timesteps(4)
    timesteps = saved.timesteps.tolist()
    tcd = f"{name} untrained, TCD eta 0"
    lcm = f"{name} untrained, LCMScheduler"
    return {
        tcd: Row(
            with_sampler(untrained, TCDScheduler.from_config(saved.config)), 4, untrained_guidance, timesteps
        ),
        f"{name}, TCD eta 0": Row(
            with_sampler(trained, TCDScheduler.from_config(saved.config)), 4, guidance, timesteps, pair=tcd
        ),
        lcm: Row(
            with_sampler(untrained, type(saved).from_config(saved.config)),
            4,
            untrained_guidance,
            timesteps,
            stochastic=True,
        ),
        f"{name}, LCMScheduler (saved)": Row(trained, 4, guidance, timesteps, stochastic=True, pair=lcm),
    }


def load_lora_student(teacher_dir: str, out: Path):
    """The teacher with the DMD2 LoRA (PEFT file, diffusers' default name) and the scheduler saved beside it."""
    from diffusers import DiffusionPipeline, LCMScheduler

    pipe = DiffusionPipeline.from_pretrained(teacher_dir)
    pipe.load_lora_weights(str(out))
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    return pipe


def measure(
    teacher_ref: str, students: dict[str, tuple], resolution: int, guidance: float, seeds: list[int]
) -> dict[str, dict]:
    """Every row against the teacher at 50 steps: mean scores, the timesteps sampled, wins over its pair."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, DiffusionPipeline

    from sdcompress.checkpoint.resolve import load_model

    teacher = DiffusionPipeline.from_pretrained(load_model(teacher_ref).path)
    own = type(teacher.scheduler).__name__.removesuffix("Scheduler")
    rows: dict[str, Row] = {
        f"teacher 4 steps ({own}), guided": Row(teacher, 4, guidance),
        "teacher 4 steps (DDIM trailing), guided": Row(
            with_scheduler(teacher, DDIMScheduler, clip_sample=False, timestep_spacing="trailing"),
            4,
            guidance,
        ),
    }
    for name, (trained, untrained, scale, untrained_scale) in students.items():
        rows |= student_rows(name, trained, untrained, scale, untrained_scale)
    for row in (*rows.values(), Row(teacher, 0, 0)):
        row.pipe.set_progress_bar_config(disable=True)
    factor = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    shape = (1, teacher.unet.config.in_channels, resolution // factor, resolution // factor)
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    sampled: dict[str, list[int]] = {}
    for prompt in PROMPTS:
        for seed in seeds:
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            ref_latent, ref_image = sample(teacher, latents, prompt, 50, guidance)
            for name, row in rows.items():
                call = {"generator": torch.Generator().manual_seed(10_000 + seed)} if row.stochastic else {}
                if "TCD" in name:
                    call["eta"] = 0.0
                latent, image = sample(row.pipe, latents, prompt, row.steps, row.guidance, **call)
                sampled[name] = row.pipe.scheduler.timesteps.tolist()
                if row.timesteps is not None and sampled[name] != row.timesteps:
                    raise SystemExit(f"{name} sampled {sampled[name]}, not the student's {row.timesteps}")
                mse = float(torch.nn.functional.mse_loss(latent, ref_latent))
                scores[name].append((mse, psnr(ref_image, image)))
    results = {}
    for name, row in rows.items():
        mean = np.mean(np.array(scores[name]), axis=0).tolist()
        results[name] = {"latent_mse": mean[0], "psnr_db": mean[1], "timesteps": sampled[name]}
        if row.pair is not None:
            wins = sum(a[0] < b[0] for a, b in zip(scores[name], scores[row.pair], strict=True))
            results[name]["closer"] = f"{wins}/{len(scores[name])}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=200, help="fine-tuning steps of tiny-sdxl first")
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--lcm-steps", type=int, default=100, help="LCM training steps (0: no LCM student)")
    parser.add_argument("--lcm-lr", type=float, default=1e-4)
    parser.add_argument("--dmd-steps", type=int, default=30, help="DMD2 student steps per student")
    parser.add_argument("--dmd-lr", type=float, default=1e-4, help="the pruned (full) DMD2 student's lr")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="the DMD2 LoRA student's lr")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--fake-updates", type=int, default=5)
    parser.add_argument("--fake-lr", type=float, default=None, help="default: each student's lr")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--students", default="lora,pruned", help="DMD2 students: lora, pruned or both")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument(
        "--guidance", type=float, default=3.0, help="the reference's CFG and DMD2's real score's"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument(
        "--keep", type=Path, help="work folder kept between runs (the teacher and LCM reused)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.training.demo_data import write_demo_dataset

    diffusers_logging.disable_progress_bar()

    names = [s for s in args.students.split(",") if s]
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdc-few-step-")))
        shared = work / "shared"  # the data, the teacher and LCM: reused by later runs with --keep
        stamp = json.dumps({k: getattr(args, k) for k in ("teacher_steps", "teacher_lr", "resolution")})
        if (shared / "stamp.json").exists() and (shared / "stamp.json").read_text() != stamp:
            raise SystemExit(f"{shared} holds a teacher trained with other settings; use another --keep")
        if not (shared / "stamp.json").exists():
            data = write_demo_dataset(shared / "data", 16, size=args.resolution)
            train_teacher(shared, data, args.teacher_steps, args.resolution, args.teacher_lr, MODEL)
            (shared / "stamp.json").write_text(stamp)
        data = shared / "data"
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="run-", dir=work)))
        teacher = str(shared / "teacher") if args.teacher_steps else MODEL
        teacher_pipe = DiffusionPipeline.from_pretrained(load_model(teacher).path)
        students: dict[str, tuple] = {}
        if args.lcm_steps:
            lcm = shared / f"lcm-{args.lcm_steps}-{args.lcm_lr}"
            if not lcm.exists():
                trained = train_lcm(
                    run_dir, teacher, data, args.lcm_steps, args.resolution, args.lcm_lr, 50, (1.0, 3.0)
                )
                trained.rename(lcm)
            # untrained: the teacher, unguided (the guidance embedding the student adds starts at zero)
            students["LCM"] = (DiffusionPipeline.from_pretrained(lcm), teacher_pipe, args.guidance, 0.0)
        common = dict(
            steps=args.dmd_steps,
            guidance=args.guidance,
            fake_updates=args.fake_updates,
            fake_lr=args.fake_lr,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        if "lora" in names:
            run = DmdRun("dmd2-lora", None, args.lora_rank, args.lora_lr, **common)
            out = train_dmd2(run_dir, teacher, data, run, args.resolution)
            students[f"DMD2 LoRA r{args.lora_rank}"] = (
                load_lora_student(load_model(teacher).path, out),
                teacher_pipe,
                0.0,
                0.0,
            )
        if "pruned" in names:
            pruned = prune_teacher(run_dir, teacher)
            run = DmdRun("dmd2-pruned", pruned, None, args.dmd_lr, **common)
            out = train_dmd2(run_dir, teacher, data, run, args.resolution)
            students["DMD2 pruned"] = (
                DiffusionPipeline.from_pretrained(out),
                DiffusionPipeline.from_pretrained(pruned),
                0.0,
                0.0,
            )
        results = measure(teacher, students, args.resolution, args.guidance, args.seeds)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    count = len(PROMPTS) * len(args.seeds)
    print(
        f"against the teacher at 50 steps ({count} samples: {len(PROMPTS)} prompts x seeds {args.seeds}, "
        f"guidance {args.guidance}):"
    )
    print(f"{'sampler':<42}{'timesteps':>20}{'latent MSE':>12}{'PSNR dB':>10}{'closer':>8}")
    for name, row in results.items():
        steps = ",".join(map(str, row["timesteps"]))
        print(
            f"{name:<42}{steps:>20}{row['latent_mse']:>12.4f}{row['psnr_db']:>10.2f}{row.get('closer', ''):>8}"
        )


if __name__ == "__main__":
    main()
