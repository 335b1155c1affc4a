"""Teacher agreement: how far a student's images are from its teacher's for the same prompt and seed.

These need no weights beyond the models themselves, so `eval` always has them and
`distill --eval-every` can log them during training. PSNR and SSIM are written
here in torch (a few lines each) rather than taken from torchmetrics: the fixed
stack has no image-quality metrics, and the metrics that run inside training
must not need the optional `eval` extra. SSIM follows Wang et al. (2004): an
11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, on each RGB channel,
over the valid region, as scikit-image's `structural_similarity` with
`gaussian_weights=True` computes it (a test checks the two agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


@dataclass
class Agreement:
    """Means over image pairs; PSNR is inf when every pair is identical."""

    latent_mse: float
    psnr: float
    ssim: float
    pairs: int

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "latent_mse": self.latent_mse,
            "psnr": "inf" if math.isinf(self.psnr) else self.psnr,  # JSON has no infinity
            "ssim": self.ssim,
            "pairs": self.pairs,
        }


def latent_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference of two latent batches (N, C, h, w) -> (N,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two image batches in [0, 1] (N, 3, H, W) -> (N,); inf for identical images."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return torch.where(mse == 0, torch.full_like(mse, math.inf), -10 * torch.log10(mse)).float()


def _gaussian_window(channels: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean SSIM of two image batches in [0, 1] (N, C, H, W) -> (N,); 1 for identical images."""
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px a side, got {tuple(a.shape[-2:])}.")
    a, b = a.double(), b.double()
    channels = a.shape[1]
    window = _gaussian_window(channels, a.device)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (numerator / denominator).flatten(1).mean(1).float()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) as floats in [0, 1]."""
    return images.float() / 255.0


def agreement(
    student_latents: torch.Tensor,
    teacher_latents: torch.Tensor,
    student_images: torch.Tensor,
    teacher_images: torch.Tensor,
) -> Agreement:
    """Latent MSE, PSNR and SSIM of a student against its teacher; images are uint8 (N, 3, H, W)."""
    if student_images.shape != teacher_images.shape:
        raise ValueError(
            f"student images {tuple(student_images.shape)} and teacher images "
            f"{tuple(teacher_images.shape)} differ in shape; generate both at one resolution."
        )
    a, b = to_unit(student_images), to_unit(teacher_images)
    return Agreement(
        latent_mse=float(latent_mse(student_latents, teacher_latents).mean()),
        psnr=float(psnr(a, b).mean()),
        ssim=float(ssim(a, b).mean()),
        pairs=int(a.shape[0]),
    )
