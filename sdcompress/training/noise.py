"""Forward diffusion for training: noise, timesteps, and what the U-Net must predict.

All randomness comes from an explicit generator the engine seeds from the step
number, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdcompress.training.config import NoiseConfig


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
    """The tensor the U-Net learns to output: the noise (epsilon) or the velocity (v-prediction)."""
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def add_noise(
    scheduler, latents: torch.Tensor, config: NoiseConfig, generator: torch.Generator
) -> NoisyBatch:
    """Noise `latents` at uniformly drawn timesteps and give the matching target."""
    kind = config.prediction_type or scheduler.config.prediction_type
    noise = sample_noise(latents, config.offset, generator)
    timesteps = torch.randint(
        0,
        scheduler.config.num_train_timesteps,
        (latents.shape[0],),
        generator=generator,
        device=latents.device,
    ).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps, kind)
    return NoisyBatch(
        noisy_latents=noisy, timesteps=timesteps, noise=noise, target=target, prediction_type=kind
    )
