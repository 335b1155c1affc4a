"""Loss terms: the diffusion (task) loss with optional Min-SNR weighting, and plain MSE terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample Min-SNR weights: min(snr, gamma) / snr, divided by (snr + 1) for v-prediction.

    The x0 (sample) loss is the epsilon loss divided by snr, so the paper's min(snr, gamma) on x0
    is the same weighting as min(snr, gamma) / snr on epsilon.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    return clipped / snr


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    scheduler=None,
    timesteps: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Mean squared error between prediction and target, Min-SNR weighted per sample when gamma is set."""
    prediction, target = prediction.float(), target.float()
    if not snr_gamma:
        return F.mse_loss(prediction, target, reduction="mean")
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=list(range(1, prediction.ndim)))
    weights = min_snr_weights(scheduler, timesteps, snr_gamma, prediction_type)
    return (per_sample * weights).mean()


def feature_mse(student: torch.Tensor, teacher: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """MSE between two features; with `normalize`, divided by the teacher feature's mean square.

    Raw feature MSEs are orders of magnitude larger than the output loss (the
    activations are large), so normalising makes every term comparable to 1.
    """
    student, teacher = student.float(), teacher.float()
    loss = F.mse_loss(student, teacher, reduction="mean")
    if normalize:
        loss = loss / teacher.pow(2).mean().clamp_min(1e-8)
    return loss
