"""Forward diffusion for training: noise, timesteps, and what the U-Net must predict.

All randomness comes from an explicit generator the engine seeds from the step
number, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdcompress.errors import SdcError
from sdcompress.training.config import NoiseConfig

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("trailing", "leading", "linspace")


@dataclass
class NoisyBatch:
    """The U-Net's inputs and its regression target for one batch."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor
    prediction_type: str


def sample_noise(latents: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, plus `offset * randn(B, C, 1, 1)` (noise offset)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        shift = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device
        ).to(latents.dtype)
        noise = noise + offset * shift
    return noise


def training_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, kind: str
):
    """The tensor the U-Net learns to output: the noise (epsilon), the velocity (v) or the clean latents (sample)."""
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction type {kind!r}")


def _alpha_sigma(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast over `like`."""
    alphas = scheduler.alphas_cumprod.to(like.device, torch.float32)[timesteps]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return alphas.sqrt().reshape(shape), (1 - alphas).sqrt().reshape(shape)


def convert_prediction(
    prediction: torch.Tensor,
    source: str,
    target: str,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
) -> torch.Tensor:
    """A U-Net output of kind `source` re-expressed as kind `target` at the same noisy latents and timesteps.

    With x_t = a x0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)) and v = a eps - s x0, each
    kind determines the other two; a teacher predicting x0 can teach an epsilon student and vice versa.
    """
    if source == target:
        return prediction
    for kind in (source, target):
        if kind not in PREDICTION_TYPES:
            raise SdcError(
                f"prediction type {kind!r} cannot be converted (known: {', '.join(PREDICTION_TYPES)}); "
                "use a teacher and student with an epsilon, v_prediction or sample scheduler."
            )
    pred, x = prediction.float(), noisy.float()
    a, s = _alpha_sigma(scheduler, timesteps, pred)
    if source == "epsilon":
        eps, x0 = pred, (x - s * pred) / a
    elif source == "sample":
        x0, eps = pred, (x - a * pred) / s
    else:
        x0, eps = a * x - s * pred, s * x + a * pred
    out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[target]
    return out.to(prediction.dtype)


def timestep_set(spec: str | None, scheduler) -> torch.Tensor | None:
    """The timesteps a step-distilled teacher was trained for, from `--timesteps` (None: all of them).

    `trailing:4`, `leading:4` or `linspace:4` take the timesteps a diffusers scheduler with that
    spacing runs at 4 steps (DDIMScheduler's rule, the one SDXL-Lightning and Turbo are sampled with);
    a list `999,749,499,249` is taken as written.
    """
    if spec is None or not str(spec).strip():
        return None
    total = scheduler.config.num_train_timesteps
    text = str(spec).strip().lower()
    spacing, _, count = text.partition(":")
    if spacing in SPACINGS:
        if not count.strip().isdigit() or not 1 <= int(count) <= total:
            raise SdcError(f"--timesteps {spec!r} needs a step count from 1 to {total}, e.g. {spacing}:4.")
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(scheduler.config, timestep_spacing=spacing)
        ddim.set_timesteps(int(count))
        values = ddim.timesteps.long().tolist()
    else:
        try:
            values = [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise SdcError(
                f"--timesteps {spec!r} is neither SPACING:N (trailing, leading, linspace) nor a list of "
                "integers such as 999,749,499,249."
            ) from None
    if not values or min(values) < 0 or max(values) >= total:
        raise SdcError(f"--timesteps {spec!r} must lie in 0..{total - 1}, the teacher's training timesteps.")
    return torch.tensor(sorted(set(values)), dtype=torch.long)


def timestep_spacing(spec: str | None) -> str | None:
    """The scheduler spacing `--timesteps` names (`trailing:4` -> trailing), for the saved scheduler config."""
    spacing = str(spec or "").strip().lower().partition(":")[0]
    return spacing if spacing in SPACINGS else None


def draw_timesteps(
    scheduler,
    count: int,
    generator: torch.Generator,
    device: torch.device,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`count` timesteps, uniform over all training timesteps or over `allowed`."""
    high = scheduler.config.num_train_timesteps if allowed is None else len(allowed)
    index = torch.randint(0, high, (count,), generator=generator, device=device).long()
    return index if allowed is None else allowed.to(device)[index]


def add_noise(
    scheduler,
    latents: torch.Tensor,
    config: NoiseConfig,
    generator: torch.Generator,
    allowed: torch.Tensor | None = None,
) -> NoisyBatch:
    """Noise `latents` at timesteps drawn uniformly (from `allowed` when given) and give the matching target."""
    kind = config.prediction_type or scheduler.config.prediction_type
    noise = sample_noise(latents, config.offset, generator)
    timesteps = draw_timesteps(scheduler, latents.shape[0], generator, latents.device, allowed)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps, kind)
    return NoisyBatch(
        noisy_latents=noisy, timesteps=timesteps, noise=noise, target=target, prediction_type=kind
    )
