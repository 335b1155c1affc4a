"""Knowledge distillation as a task on the shared loop.

L = w_task * L_task + w_out * MSE(student, teacher) + w_feat * sum_i MSE(f_student_i, f_teacher_i),
each MSE mean-reduced, every term returned for logging (BK-SDM's weights 1/1/1 by default).

Like with like: the output loss compares both predictions in the *student's* prediction space (the
teacher's epsilon, v or x0 output is converted at the same noisy latents and timestep), the space
the task loss is in too. Features are the U-Nets' inner activations, which mean something else when
the two predict different things, so feature matching needs one prediction type for both.
The teacher is frozen, runs without gradients in half precision on a GPU (fp32
on the CPU, where half is slow and inexact), and shares the student's single
text-encoder forward and noisy latents.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdcompress.errors import SdcError
from sdcompress.training.config import DistillWeights
from sdcompress.training.features import FeaturePair, FeatureTaps
from sdcompress.training.losses import feature_mse
from sdcompress.training.noise import convert_prediction
from sdcompress.training.task import (
    DiffusionParts,
    DiffusionTask,
    LossConfig,
    TrainingSummary,
    place_teacher,
    run_unet,
)

StudentSaver = Callable[[torch.nn.Module, Path, TrainingSummary], None]


class DistillTask(DiffusionTask):
    """Train `parts.unet` (the student) to imitate `teacher`."""

    name = "distill"

    def __init__(
        self,
        parts: DiffusionParts,
        teacher: torch.nn.Module,
        pairs: list[FeaturePair],
        *,
        saver: StudentSaver,
        weights: DistillWeights = DistillWeights(),
        loss: LossConfig = LossConfig(),
        feature_norm: bool = False,
        teacher_prediction: str | None = None,
    ) -> None:
        super().__init__(parts, loss)
        # The pipeline's scheduler is the teacher's, so its prediction type is the teacher's by default.
        self.teacher_prediction = str(teacher_prediction or parts.noise_scheduler.config.prediction_type)
        if self.teacher_prediction != self.prediction_type and pairs and weights.features:
            raise SdcError(
                f"the teacher predicts {self.teacher_prediction} and the student {self.prediction_type}, so "
                "their features cannot be compared; pass --features none (or --feature-weight 0), or train "
                "the student with the teacher's --prediction-type."
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.pairs = pairs
        self.weights = weights
        self.feature_norm = feature_norm
        self.saver = saver  # the service writes through the project's writers (save_diffusers)
        self.student: torch.nn.Module = parts.unet
        self.teacher_dtype = torch.float32
        self._teacher_taps = FeatureTaps(teacher, [p.teacher for p in pairs], detach=True)
        self._student_taps = FeatureTaps(parts.unet, [p.student for p in pairs], detach=False)
        self._shapes_checked = False

    # -- TrainTask ---------------------------------------------------------

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.parts.unet}

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        self.parts.unet.train()
        return [{"params": [p for p in self.parts.unet.parameters() if p.requires_grad], "lr": lr}]

    def bind(
        self, prepared: dict[str, torch.nn.Module], device: torch.device, weight_dtype: torch.dtype
    ) -> None:
        self.student = prepared["unet"]
        self.move_frozen(device, weight_dtype)
        self.teacher_dtype = place_teacher(self.teacher, device, weight_dtype)

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        prepared = self.prepare(batch, generator)
        self._teacher_taps.clear()
        self._student_taps.clear()
        with torch.no_grad():
            teacher_pred = run_unet(self.teacher, prepared, dtype=self.teacher_dtype)
            teacher_pred = convert_prediction(
                teacher_pred.float(),
                self.teacher_prediction,
                self.prediction_type,
                prepared.noisy.noisy_latents,
                prepared.noisy.timesteps,
                self.parts.noise_scheduler,
            )
        student_pred = run_unet(self.student, prepared)
        task = self.task_loss(student_pred, prepared)
        output = F.mse_loss(student_pred.float(), teacher_pred.float())
        features = self._feature_loss(student_pred)
        loss = self.weights.task * task + self.weights.output * output + self.weights.features * features
        self._teacher_taps.clear()
        self._student_taps.clear()
        return {"loss": loss, "task": task, "output": output, "features": features}

    def _feature_loss(self, like: torch.Tensor) -> torch.Tensor:
        s_feats, t_feats = self._student_taps.features, self._teacher_taps.features
        if not self._shapes_checked:
            for pair in self.pairs:
                s, t = s_feats[pair.student], t_feats[pair.teacher]
                if s.shape != t.shape:
                    raise SdcError(
                        f"student feature {pair.student} {tuple(s.shape)} and teacher feature {pair.teacher} "
                        f"{tuple(t.shape)} differ in shape; distill a student pruned from this teacher "
                        "(or pass --features none)."
                    )
            self._shapes_checked = True
        total = like.new_zeros((), dtype=torch.float32)
        for pair in self.pairs:
            total = total + feature_mse(
                s_feats[pair.student], t_feats[pair.teacher], normalize=self.feature_norm
            )
        return total

    def validation_pipeline(self):
        return self.parts.pipeline(unet=self.parts.unet)

    def save(self, output_dir: Path, summary: TrainingSummary) -> None:
        self.saver(self.parts.unet, output_dir, summary)

    def close(self) -> None:
        """Remove the hooks (the modules may be reused after training)."""
        self._teacher_taps.remove()
        self._student_taps.remove()
