"""Few-step students side by side: teacher 50 steps vs teacher 4 steps vs LCM 4 steps vs DMD2 4 steps.

On tiny-sd (fine-tuned first on the generated shapes data, as benchmarks/lcm.py does, whose helpers
this script imports), trains `distill --objective lcm` and `distill --objective dmd2` (full students,
the teacher as initialisation) on the CPU, then samples fixed prompts and seeds from the same initial
noise with:

- the teacher, its own scheduler, 50 steps, guided (the reference);
- the untrained student (the teacher itself), its own scheduler, 4 steps, guided;
- the LCM student, LCMScheduler, 4 steps (guidance through its w embedding);
- the DMD2 student, its saved LCMScheduler (timesteps 999/749/499/249), 4 steps, no guidance (the
  guidance is in its weights: the real score was guided with the same scale).

Printed per sampler: latent MSE to the reference and PSNR of the decoded images (higher: closer).

    python benchmarks/few_step.py --teacher-steps 100 --steps 100 --dmd-steps 60 --resolution 32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lcm import PROMPTS, SEEDS, sample, train_teacher  # noqa: E402
from lcm import train as train_lcm  # noqa: E402


def train_dmd2(
    work: Path, teacher: str, data: Path, steps: int, resolution: int, lr: float, guidance: float
) -> Path:
    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.training.config import ConsistencyConfig, DmdConfig
    from sdcompress.training.data import DataConfig
    from sdcompress.training.engine import TrainConfig

    out = work / "dmd2"
    request = DistillRequest(
        teacher=teacher,
        student=None,
        output=out,
        data=DataConfig(data_dir=data, resolution=resolution),
        train=TrainConfig(
            work_dir=work / "dmd2.train", max_steps=steps, batch_size=4, lr=lr, checkpoint_every=0, cpu=True
        ),
        save_dtype="fp32",
        consistency=ConsistencyConfig(objective="dmd2"),
        dmd=DmdConfig(student_steps="4", teacher_guidance=guidance),
    )
    started = time.perf_counter()
    result = distill(request)
    print(
        f"trained {result.steps} DMD2 steps in {time.perf_counter() - started:.0f} s; "
        f"dm loss {result.first_losses['dm']:.4g} -> {result.last_losses['dm']:.4g}, "
        f"fake denoising {result.first_losses['fake_denoise']:.4g} -> {result.last_losses['fake_denoise']:.4g}"
    )
    return out


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def measure(teacher_ref: str, lcm: Path, dmd2: Path, resolution: int, guidance: float) -> dict[str, dict]:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from sdcompress.checkpoint.resolve import load_model

    teacher = StableDiffusionPipeline.from_pretrained(load_model(teacher_ref).path)
    lcm_pipe = StableDiffusionPipeline.from_pretrained(lcm)
    dmd_pipe = StableDiffusionPipeline.from_pretrained(dmd2)
    for pipe in (teacher, lcm_pipe, dmd_pipe):
        pipe.set_progress_bar_config(disable=True)
    factor = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    shape = (1, teacher.unet.config.in_channels, resolution // factor, resolution // factor)
    runs = {
        "untrained 4 steps": (teacher, 4, guidance),
        "LCM 4 steps": (lcm_pipe, 4, guidance),
        "DMD2 4 steps": (dmd_pipe, 4, 0.0),
    }
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for prompt in PROMPTS:
        for seed in SEEDS:
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            ref_latent, ref_image = sample(teacher, latents, prompt, 50, guidance)
            for name, (pipe, steps, scale) in runs.items():
                torch.manual_seed(seed)  # LCMScheduler draws its re-noising from the global RNG
                latent, image = sample(pipe, latents, prompt, steps, scale)
                scores[name].append(
                    (float(torch.nn.functional.mse_loss(latent, ref_latent)), psnr(ref_image, image))
                )
    return {
        name: dict(zip(("latent_mse", "psnr_db"), np.mean(np.array(rows), axis=0).tolist(), strict=True))
        for name, rows in scores.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=300, help="fine-tuning steps of tiny-sd first")
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=300, help="LCM training steps")
    parser.add_argument("--dmd-steps", type=int, default=100, help="DMD2 student steps (5 fake updates each)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dmd-lr", type=float, default=1e-4)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    from sdcompress.training.demo_data import write_demo_dataset

    with tempfile.TemporaryDirectory(prefix="sdc-few-step-") as tmp:
        work = Path(tmp)
        data = write_demo_dataset(work / "data", 16, size=args.resolution)
        teacher = train_teacher(work, data, args.teacher_steps, args.resolution, args.teacher_lr)
        lcm = train_lcm(work, teacher, data, args.steps, args.resolution, args.lr, 50, (1.0, 3.0))
        dmd2 = train_dmd2(work, teacher, data, args.dmd_steps, args.resolution, args.dmd_lr, args.guidance)
        results = measure(teacher, lcm, dmd2, args.resolution, args.guidance)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"against the teacher at 50 steps ({len(PROMPTS)} prompts x {len(SEEDS)} seeds, guidance {args.guidance}):"
    )
    print(f"{'sampler':<20}{'latent MSE':>12}{'PSNR dB':>10}")
    for name, row in results.items():
        print(f"{name:<20}{row['latent_mse']:>12.4f}{row['psnr_db']:>10.2f}")


if __name__ == "__main__":
    main()
