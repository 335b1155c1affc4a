"""Few-step students: tiny-sd's LCM student at 4 steps vs the teacher at 4 steps, both against the
teacher at 50 steps.

Trains `distill --objective lcm` on tiny-sd (the full student with the guidance embedding) on the
generated shapes data for --steps steps on the CPU, then samples fixed prompts and seeds from the
same initial noise with:

- the teacher, its own scheduler, 50 steps (the reference),
- the teacher, its own scheduler, 4 steps,
- the LCM student, LCMScheduler, 4 steps,

all at the same guidance scale (the student reads it through its w embedding). It prints, per
sampler, the latent MSE to the reference and the PSNR / SSIM of the decoded images (scikit-image,
in the `test` extra). Lower MSE, higher PSNR / SSIM: closer to the 50-step teacher.

    python benchmarks/lcm.py                               # 300 steps, 64 px
    python benchmarks/lcm.py --steps 100 --resolution 32   # what a shared 2-core CPU affords

tiny-sd has random weights: its 50-step images are not pictures, and what is measured is only how
well each few-step sampler follows the teacher's ODE.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

PROMPTS = ("a red circle on a blue background", "a green square", "a yellow triangle on black", "a cat")
SEEDS = (0, 1)


def train(
    work: Path, steps: int, resolution: int, lr: float, ddim: int, w_range: tuple[float, float]
) -> Path:
    from sdcompress.services.distill import DistillRequest, distill
    from sdcompress.training.config import ConsistencyConfig
    from sdcompress.training.data import DataConfig
    from sdcompress.training.demo_data import write_demo_dataset
    from sdcompress.training.engine import TrainConfig

    data = write_demo_dataset(work / "data", 16, size=resolution)
    out = work / "lcm"
    request = DistillRequest(
        teacher="tiny-sd",
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


def sample(pipe, latents, prompt: str, steps: int, guidance: float):
    import torch

    with torch.no_grad():
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents.clone(),
            output_type="latent",
        ).images
        image = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    return out, ((image.clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 0).numpy()


def measure(student_dir: Path, resolution: int, guidance: float) -> dict[str, dict[str, float]]:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from sdcompress.checkpoint.resolve import load_model

    teacher = StableDiffusionPipeline.from_pretrained(load_model("tiny-sd").path)
    student = StableDiffusionPipeline.from_pretrained(student_dir)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    factor = 2 ** (len(teacher.vae.config.block_out_channels) - 1)
    shape = (1, teacher.unet.config.in_channels, resolution // factor, resolution // factor)
    runs = {"teacher 4 steps": (teacher, 4), "LCM student 4 steps": (student, 4)}
    scores: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
    for prompt in PROMPTS:
        for seed in SEEDS:
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            ref_latent, ref_image = sample(teacher, latents, prompt, 50, guidance)
            for name, (pipe, steps) in runs.items():
                latent, image = sample(pipe, latents, prompt, steps, guidance)
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
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ddim-timesteps", type=int, default=50)
    # tiny-sd's random weights make guidance a pure amplifier of noise: keep it small (scale = 1 + w)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--w-min", type=float, default=1.0)
    parser.add_argument("--w-max", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="sdc-lcm-") as tmp:
        student = train(
            Path(tmp), args.steps, args.resolution, args.lr, args.ddim_timesteps, (args.w_min, args.w_max)
        )
        results = measure(student, args.resolution, args.guidance)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"against the teacher at 50 steps ({len(PROMPTS)} prompts x {len(SEEDS)} seeds, guidance {args.guidance}):"
    )
    print(f"{'sampler':<22}{'latent MSE':>12}{'PSNR dB':>10}{'SSIM':>8}")
    for name, row in results.items():
        print(f"{name:<22}{row['latent_mse']:>12.4f}{row['psnr_db']:>10.2f}{row['ssim']:>8.3f}")


if __name__ == "__main__":
    main()
