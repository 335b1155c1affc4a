"""Few-step students: tiny-sd's LCM student at 4 steps vs the teacher at 4 steps, both against the
teacher at 50 steps.

First fine-tunes tiny-sd on the generated shapes data (--teacher-steps; its random weights alone give
an ODE that carries nowhere: its "images" are whatever a random VAE makes of latents that grow under
guidance), then trains `distill --objective lcm` from it (the full student with the guidance
embedding) for --steps steps on the CPU, then samples fixed prompts and seeds from the same initial
noise with:

- the teacher, its own scheduler (PNDM), 50 steps: the reference;
- the teacher at 4 steps, with its own scheduler and with DDIM;
- the LCM student at 4 steps with LCMScheduler (what it ships with: fresh noise between steps) and with
  TCD at gamma 0 (the deterministic multistep consistency sampler, comparable seed by seed);

all at the same guidance scale (the student reads it through its w embedding). It prints, per
sampler, the latent MSE to the reference and the PSNR / SSIM of the decoded images (scikit-image,
in the `test` extra). Lower MSE, higher PSNR / SSIM: closer to the 50-step teacher.

    python benchmarks/lcm.py                                       # 300 + 300 steps, 64 px
    python benchmarks/lcm.py --teacher-steps 150 --steps 500 --resolution 32   # a shared 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

PROMPTS = ("a red circle on a blue background", "a green square", "a yellow triangle on black", "a cat")
SEEDS = (0, 1)


def train_teacher(
    work: Path, data: Path, steps: int, resolution: int, lr: float, model: str = "tiny-sd"
) -> str:
    """`model` fine-tuned on the shapes data, so that its ODE carries somewhere (0 steps: random weights)."""
    if steps == 0:
        return model
    from sdcompress.services.finetune import FinetuneRequest, finetune
    from sdcompress.training.data import DataConfig
    from sdcompress.training.engine import TrainConfig

    out = work / "teacher"
    started = time.perf_counter()
    result = finetune(
        FinetuneRequest(
            model=model,
            output=out,
            data=DataConfig(data_dir=data, resolution=resolution),
            train=TrainConfig(
                work_dir=work / "teacher.train",
                max_steps=steps,
                batch_size=8,
                lr=lr,
                checkpoint_every=0,
                cpu=True,
            ),
            save_dtype="fp32",
        )
    )
    print(
        f"teacher: fine-tuned {model} {result.steps} steps in {time.perf_counter() - started:.0f} s; "
        f"loss {result.first_losses['loss']:.4g} -> {result.last_losses['loss']:.4g}"
    )
    return str(out)


def train(
    work: Path,
    teacher: str,
    data: Path,
    steps: int,
    resolution: int,
    lr: float,
    ddim: int,
    w_range: tuple[float, float],
) -> Path:
    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.training.config import ConsistencyConfig
    from sdcompress.training.data import DataConfig
    from sdcompress.training.engine import TrainConfig

    out = work / "lcm"
    request = DistillRequest(
        teacher=teacher,
        student=None,
        output=out,
        data=DataConfig(data_dir=data, resolution=resolution),
        train=TrainConfig(
            work_dir=work / "lcm.train", max_steps=steps, batch_size=4, lr=lr, checkpoint_every=0, cpu=True
        ),
        save_dtype="fp32",
        consistency=ConsistencyConfig(
            objective="lcm", ddim_timesteps=ddim, w_min=w_range[0], w_max=w_range[1]
        ),
    )
    started = time.perf_counter()
    result = distill(request)
    print(
        f"trained {result.steps} LCM steps in {time.perf_counter() - started:.0f} s; "
        f"consistency loss {result.first_losses['consistency']:.4g} -> {result.last_losses['consistency']:.4g}"
    )
    return out


def sample(pipe, latents, prompt: str, steps: int, guidance: float, **call):
    """One image from fixed initial latents: the final latent and the decoded image in [0, 1] (HWC)."""
    import torch

    with torch.no_grad():
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents.clone(),
            output_type="latent",
            **call,
        ).images
        image = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    return out, ((image.clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 0).numpy()


def with_scheduler(pipe, scheduler_class, **overrides):
    """The same pipeline (shared modules) with another sampler built from its scheduler config."""
    return type(pipe)(
        **{**pipe.components, "scheduler": scheduler_class.from_config(pipe.scheduler.config, **overrides)}
    )


def samplers(teacher, student) -> dict[str, tuple]:
    """name -> (pipeline, steps, extra call arguments): the rows of the comparison.

    LCMScheduler (what the student ships with) draws fresh noise between its steps, so its 4-step image
    is another sample of the distribution, not the end of the seed's own trajectory; TCD with gamma 0 is
    the deterministic multistep consistency sampler (each jump re-noised with the model's own noise
    estimate), the one whose images can be compared seed by seed. The teacher under LCMScheduler shows
    what fresh noise alone does to a seed-by-seed score; under DDIM with trailing timesteps (the
    consistency samplers' 999/759/499/259), what a better 4-step schedule alone does. DDIM's config
    default clips x0 to [-1, 1], which is wrong for latents: off here, as in SD's own DDIM config.
    """
    import torch
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

    own = type(teacher.scheduler).__name__.removesuffix("Scheduler")
    return {
        f"teacher 4 steps ({own})": (teacher, 4, {}),
        "teacher 4 steps (DDIM)": (with_scheduler(teacher, DDIMScheduler, clip_sample=False), 4, {}),
        "teacher 4 steps (DDIM trailing)": (
            with_scheduler(teacher, DDIMScheduler, clip_sample=False, timestep_spacing="trailing"),
            4,
            {},
        ),
        "teacher 4 steps (LCM)": (
            with_scheduler(teacher, LCMScheduler, original_inference_steps=50),
            4,
            {"generator": torch.Generator().manual_seed(1234)},
        ),
        "LCM student 4 steps (LCM)": (student, 4, {"generator": torch.Generator().manual_seed(1234)}),
        "LCM student 4 steps (TCD g=0)": (with_scheduler(student, TCDScheduler), 4, {"eta": 0.0}),
    }


def measure(
    teacher_ref: str, student_dir: Path, resolution: int, guidance: float
) -> dict[str, dict[str, float]]:
    """Each sampler against the teacher's own scheduler at 50 steps, from the same initial latents."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from sdcompress.checkpoint.resolve import load_model

    teacher = StableDiffusionPipeline.from_pretrained(load_model(teacher_ref).path)
    student = StableDiffusionPipeline.from_pretrained(student_dir)
    runs = samplers(teacher, student)
    for pipe, _, _ in (*runs.values(), (teacher, 0, {})):
        pipe.set_progress_bar_config(disable=True)
    factor = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    shape = (1, teacher.unet.config.in_channels, resolution // factor, resolution // factor)
    scores: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
    for prompt in PROMPTS:
        for seed in SEEDS:
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            ref_latent, ref_image = sample(teacher, latents, prompt, 50, guidance)
            for name, (pipe, steps, call) in runs.items():
                latent, image = sample(pipe, latents, prompt, steps, guidance, **call)
                mse = float(torch.nn.functional.mse_loss(latent, ref_latent))
                psnr = peak_signal_noise_ratio(ref_image, image, data_range=1.0)
                ssim = structural_similarity(ref_image, image, channel_axis=2, data_range=1.0)
                scores[name].append((mse, psnr, ssim))
    return {
        name: dict(
            zip(("latent_mse", "psnr_db", "ssim"), np.mean(np.array(rows), axis=0).tolist(), strict=True)
        )
        for name, rows in scores.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="LCM training steps")
    parser.add_argument(
        "--teacher-steps",
        type=int,
        default=300,
        help="fine-tuning steps of the teacher first (0: random tiny-sd)",
    )
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ddim-timesteps", type=int, default=50)
    # a teacher fine-tuned on 16 images for a few hundred steps: keep guidance moderate (scale = 1 + w)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--w-min", type=float, default=1.0)
    parser.add_argument("--w-max", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    from sdcompress.training.demo_data import write_demo_dataset

    with tempfile.TemporaryDirectory(prefix="sdc-lcm-") as tmp:
        work = Path(tmp)
        data = write_demo_dataset(work / "data", 16, size=args.resolution)
        teacher = train_teacher(work, data, args.teacher_steps, args.resolution, args.teacher_lr)
        student = train(
            work,
            teacher,
            data,
            args.steps,
            args.resolution,
            args.lr,
            args.ddim_timesteps,
            (args.w_min, args.w_max),
        )
        results = measure(teacher, student, args.resolution, args.guidance)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"against the teacher at 50 steps ({len(PROMPTS)} prompts x {len(SEEDS)} seeds, guidance {args.guidance}):"
    )
    print(f"{'sampler':<32}{'latent MSE':>12}{'PSNR dB':>10}{'SSIM':>8}")
    for name, row in results.items():
        print(f"{name:<32}{row['latent_mse']:>12.4f}{row['psnr_db']:>10.2f}{row['ssim']:>8.3f}")


if __name__ == "__main__":
    main()
