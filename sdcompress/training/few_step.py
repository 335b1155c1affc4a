"""What the few-step students' tasks (LCM, DMD2) share, written once.

Both guide the teacher against the same unguided condition, train `parts.unet` as the student
(full, or with LoRA adapters at `lora_paths`), sample validation images with the teacher's
pipeline around it, and hand saving to the service's saver (which knows the output layout:
pipeline, LoRA files, scheduler, run record).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdcompress.training.conditioning import Conditioning
from sdcompress.training.task import TrainingSummary


class FewStepStudent:
    """Mixin for a `DiffusionTask` with `saver`, `lora_paths`, `lora_spec` and `_uncond` (None at first)."""

    def uncond(self, cond: Conditioning) -> Conditioning:
        """The unguided condition: the empty prompt's embedding (SD), zeros as SDXL's pipeline uses (SDXL)."""
        batch = cond.hidden_states.shape[0]
        if self.parts.is_sdxl:
            pooled = None if cond.pooled is None else torch.zeros_like(cond.pooled)
            return Conditioning(torch.zeros_like(cond.hidden_states), pooled)
        if self._uncond is None:
            with torch.no_grad():
                self._uncond = self.encode({"captions": [""]})
        hidden = self._uncond.hidden_states.to(cond.hidden_states.device, cond.hidden_states.dtype)
        return Conditioning(hidden.expand(batch, *hidden.shape[1:]), None)

    def validation_pipeline(self):
        return self.parts.pipeline(unet=self.parts.unet)

    def save(self, output_dir: Path, summary: TrainingSummary) -> None:
        self.saver(self, output_dir, summary)

    def export_lora(self) -> list:
        """The trained student LoRA as the project's LoRA modules (for the one LoRA writer)."""
        from sdcompress.lowrank.targets import UNET
        from sdcompress.training.lora_task import export_adapters

        return export_adapters(self.parts.unet, UNET, self.lora_paths, self.lora_spec)

    def close(self) -> None:
        """Nothing to undo by default (a task that hooks modules removes its hooks here)."""
