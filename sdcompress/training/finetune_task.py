"""Fine-tuning as a task on the shared loop: the U-Net (and optionally the text encoders) on captions.

`UNetTrainingTask` holds what full fine-tuning and LoRA training share: the
trainable modules (U-Net, text encoders at their own learning rate), the
single text-encoder forward through the engine-wrapped encoders, the plain
diffusion loss, and DreamBooth's prior preservation (a class batch whose loss
is added with `prior_loss_weight`, both terms logged). `FinetuneTask` trains
every U-Net weight and hands the trained modules to a saver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdcompress.training.conditioning import Conditioning, encode_prompts
from sdcompress.training.data import CaptionedImages, DataConfig, build_dataset, collate
from sdcompress.training.task import DiffusionParts, DiffusionTask, LossConfig, TrainingSummary, run_unet

# Class images share the latent cache with the instance images; their cache keys are shifted so the two
# index ranges never collide.
CLASS_INDEX_OFFSET = 1 << 40

Saver = Callable[["UNetTrainingTask", Path, TrainingSummary], None]


@dataclass(frozen=True)
class PriorPreservation:
    """DreamBooth's prior term: class images (with `class_prompt` as caption when given) and its weight."""

    class_data: DataConfig
    class_prompt: str | None = None
    weight: float = 1.0


class ClassImages:
    """Class batches drawn with the step's generator, so the draw is the same after a resume."""

    def __init__(self, prior: PriorPreservation, seed: int) -> None:
        self.prior = prior
        self.dataset: CaptionedImages
        self.dataset, self.stats = build_dataset(prior.class_data, seed)

    def batch(self, size: int, generator: torch.Generator) -> dict[str, Any]:
        picks = torch.randint(len(self.dataset), (size,), generator=generator, device=generator.device)
        samples = [self.dataset[(int(i), 0)] for i in picks.tolist()]
        batch = collate(samples)
        batch["index"] = batch["index"] + CLASS_INDEX_OFFSET
        if self.prior.class_prompt is not None:
            batch["captions"] = [self.prior.class_prompt] * size
        return batch


def seed_global_rng(generator: torch.Generator) -> None:
    """Seed torch's global RNGs from the micro-batch's generator seed, without drawing from it.

    Dropout (peft's LoRA dropout and LoHa / LoKr rank dropout, any dropout in
    the models) draws from the global RNG, not from the engine's per-step
    generator; seeding it per micro-batch makes those draws a function of the
    step too, so a resumed run repeats them exactly.
    """
    torch.manual_seed(generator.initial_seed() ^ 0x5DC0_5EED)


class UNetTrainingTask(DiffusionTask):
    """Train parameters of the U-Net (and maybe the text encoders) with the diffusion loss."""

    name = "train"

    def __init__(
        self,
        parts: DiffusionParts,
        loss: LossConfig,
        *,
        train_text_encoders: bool = False,
        text_encoder_lr: float | None = None,
        instance_prompt: str | None = None,
        prior: PriorPreservation | None = None,
        seed: int = 0,
        saver: Saver | None = None,
    ) -> None:
        super().__init__(parts, loss, train_text_encoders=train_text_encoders)
        self.text_encoder_lr = text_encoder_lr
        self.instance_prompt = instance_prompt
        self.class_images = ClassImages(prior, seed) if prior is not None else None
        self.prior_weight = prior.weight if prior is not None else 0.0
        self.saver = saver
        self.unet: torch.nn.Module = parts.unet
        self.encoders: list[torch.nn.Module] = list(parts.text_encoders)

    # -- TrainTask ---------------------------------------------------------

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.parts.unet}
        if self.train_text_encoders:
            for i, encoder in enumerate(self.parts.text_encoders):
                modules[f"text_encoder{'_2' if i else ''}"] = encoder
        return modules

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        self.parts.unet.train()
        groups = [{"params": [p for p in self.parts.unet.parameters() if p.requires_grad], "lr": lr}]
        if self.train_text_encoders:
            params = [p for e in self.parts.text_encoders for p in e.parameters() if p.requires_grad]
            for encoder in self.parts.text_encoders:
                encoder.train()
            groups.append({"params": params, "lr": self.text_encoder_lr or lr})
        return [g for g in groups if g["params"]]

    def bind(
        self, prepared: dict[str, torch.nn.Module], device: torch.device, weight_dtype: torch.dtype
    ) -> None:
        self.unet = prepared["unet"]
        if self.train_text_encoders:
            self.encoders = [prepared[k] for k in prepared if k.startswith("text_encoder")]
        self.move_frozen(device, weight_dtype)

    def encode(self, batch: dict[str, Any]) -> Conditioning:
        # The engine-wrapped encoders (DDP, autocast) run the forward, so their gradients are synchronised.
        with torch.set_grad_enabled(self.train_text_encoders and torch.is_grad_enabled()):
            return encode_prompts(self.encoders, self.parts.tokenizers, batch["captions"], self.device)

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        seed_global_rng(generator)
        if self.instance_prompt is not None:
            batch = {**batch, "captions": [self.instance_prompt] * len(batch["captions"])}
        instance = self._loss_of(batch, generator)
        if self.class_images is None:
            return {"loss": instance}
        prior = self._loss_of(self.class_images.batch(len(batch["captions"]), generator), generator)
        return {"loss": instance + self.prior_weight * prior, "instance": instance, "prior": prior}

    def _loss_of(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        prepared = self.prepare(batch, generator)
        return self.task_loss(run_unet(self.unet, prepared), prepared)

    def validation_pipeline(self):
        return self.parts.pipeline(unet=self.parts.unet)

    def save(self, output_dir: Path, summary: TrainingSummary) -> None:
        if self.saver is None:
            raise RuntimeError(f"{type(self).__name__} was built without a saver")
        self.saver(self, output_dir, summary)


class FinetuneTask(UNetTrainingTask):
    """Full fine-tuning: every U-Net weight trains (and every text-encoder weight when asked)."""

    name = "finetune"

    def __init__(self, parts: DiffusionParts, loss: LossConfig, **kwargs: Any) -> None:
        super().__init__(parts, loss, **kwargs)
        parts.unet.requires_grad_(True)


def module_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A trained module's weights on the CPU (non-persistent buffers such as position_ids left out)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
