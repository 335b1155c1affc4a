"""Teacher agreement during distillation: `distill --eval-every N`.

A handful of fixed prompts and seeds are rendered once with the teacher (its
images never change) and every N steps with the student as it is, and the
same latent MSE, PSNR and SSIM as `sdcompress eval` are computed between the
two. The engine logs them to the tracker as `eval/latent_mse` and so on, so a
run shows whether the student is actually getting closer to its teacher, not
only whether its loss goes down.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from sdcompress.evaluation.agreement import latent_mse, psnr, ssim, to_unit
from sdcompress.evaluation.generation import render
from sdcompress.evaluation.generation_cache import GenerationSettings
from sdcompress.training.config import TeacherEvalConfig


class TeacherAgreementProbe:
    """Renders the fixed prompts with the current student and scores it against the teacher's renders."""

    def __init__(self, parts: Any, teacher_unet: torch.nn.Module, config: TeacherEvalConfig, resolution: int):
        self.parts = parts
        self.teacher_unet = teacher_unet
        self.config = config
        self.every = config.every
        self.settings = GenerationSettings(
            steps=config.steps,
            guidance=config.guidance,
            scheduler="model",
            resolution=config.resolution or resolution,
            dtype="",
            device_type="",
        )
        self._teacher: tuple[torch.Tensor, torch.Tensor] | None = None

    def _render(self, unet: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.parts.pipeline(unet=unet)
        pipe.to(device)
        autocast = (
            torch.autocast(device.type, dtype=torch.float16)
            if device.type == "cuda"
            else contextlib.nullcontext()
        )
        prompts = list(self.config.prompts)
        seeds = list(range(len(prompts)))
        with autocast:
            return render(pipe, prompts, seeds, self.settings)

    def __call__(self, device: torch.device) -> dict[str, float]:
        """`eval/latent_mse`, `eval/psnr`, `eval/ssim` of the student against the teacher now."""
        if self._teacher is None:
            self._teacher = self._render(self.teacher_unet, device)
        latents, images = self._render(self.parts.unet, device)
        teacher_latents, teacher_images = self._teacher
        a, b = to_unit(images), to_unit(teacher_images)
        return {
            "eval/latent_mse": float(latent_mse(latents, teacher_latents).mean()),
            "eval/psnr": float(psnr(a, b).mean()),
            "eval/ssim": float(ssim(a, b).mean()),
        }
