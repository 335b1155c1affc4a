"""What the few-step students' tasks (LCM, DMD2) give back after training, written once.

Both tasks train `parts.unet` as the student (full, or with LoRA adapters at `lora_paths`), sample
validation images with the teacher's pipeline around it, and hand saving to the service's saver
(which knows the output layout: pipeline, LoRA files, scheduler, run record).
"""

from __future__ import annotations

from pathlib import Path

from sdcompress.training.task import TrainingSummary


class FewStepResults:
    """Mixin for a task with `parts`, `saver`, `lora_paths` and `lora_spec`."""

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
