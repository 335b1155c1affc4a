"""The strategy the engine trains: what is trainable, how the loss is computed, how results are saved.

`TrainTask` is the whole contract between the loop and a job. `DiffusionTask`
implements the part every Stable Diffusion job shares (latents from the VAE,
optionally cached; one text-encoder forward; noise, timesteps and target; the
U-Net call with SDXL's added conditions), so distill, finetune and LoRA
training each add only what makes them different.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from sdcompress.errors import SdcError
from sdcompress.training.conditioning import Conditioning, encode_prompts, unet_added_conditions
from sdcompress.training.config import LossConfig
from sdcompress.training.losses import diffusion_loss
from sdcompress.training.noise import PREDICTION_TYPES, NoisyBatch, add_noise, timestep_set


@dataclass(frozen=True)
class TrainingSummary:
    """What a finished run hands to `TrainTask.save`, for the output's run record or model card."""

    steps: int
    epoch: int
    loss_history: list[dict[str, float]]
    data: dict[str, Any]
    options: dict[str, Any]


@dataclass
class AuxiliaryModel:
    """A second model a task trains beside the main one, on its own optimizer, `updates` steps per main step.

    DMD2's fake score is one: it must track the student's distribution, so it takes several updates
    (the two time-scale rule) on its own loss before each student update. The engine prepares the
    modules with accelerate, builds their optimizer (`groups`, each with its own lr), checkpoints both
    and runs `compute_loss(batch, generator)` on the step's micro-batches before the main update.
    """

    name: str
    modules: dict[str, torch.nn.Module]
    groups: list[dict[str, Any]]
    updates: int
    compute_loss: Any  # Callable[[dict[str, Any], torch.Generator], dict[str, torch.Tensor]]


@runtime_checkable
class TrainTask(Protocol):
    """One training job on the shared loop.

    Optional hooks the loop calls when a task has them: `check_dataset(dataset)` before the first
    step, `checkpoint_state()` (more objects to save and restore with each checkpoint, e.g. LCM's
    target network), `after_optimizer_step()` (e.g. that network's EMA update) and
    `auxiliary_models()` (models on their own optimizers, updated before each main step: `AuxiliaryModel`);
    `bind` then receives their prepared modules too.
    """

    name: str

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules with trainable parameters; the engine wraps them (DDP, mixed precision) and checkpoints them."""

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (own lr per group allowed)."""

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in the trainable modules."""

    def bind(
        self, prepared: dict[str, torch.nn.Module], device: torch.device, weight_dtype: torch.dtype
    ) -> None:
        """Receive the wrapped trainable modules and move the frozen parts to the device."""

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The loss for one batch: a dict with a differentiable "loss" entry and named terms."""

    def validation_pipeline(self):
        """A diffusers pipeline using the current weights, for validation images (or None)."""

    def save(self, output_dir: Path, summary: TrainingSummary) -> None:
        """Write the trained result into `output_dir` (an empty temporary folder), with the run's record."""


@dataclass
class DiffusionParts:
    """A Stable Diffusion model taken apart for training; `unet` is the model being trained."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    pipeline_class: type | None = None
    extra_components: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @classmethod
    def from_pipeline(cls, pipe) -> DiffusionParts:
        """Parts of a loaded diffusers pipeline; its scheduler's settings become a DDPM training scheduler."""
        from diffusers import DDPMScheduler

        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                _rebuild_meta_position_ids(module)
        encoders = [pipe.text_encoder] + (
            [pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else []
        )
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
        known = {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
        extra = {k: v for k, v in pipe.components.items() if k not in known}
        return cls(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            pipeline_class=type(pipe),
            extra_components={"scheduler": pipe.scheduler, **extra},
        )

    def pipeline(self, unet: torch.nn.Module | None = None):
        """A pipeline of the same class around `unet` (default: the parts' own U-Net)."""
        components: dict[str, Any] = {
            "unet": unet if unet is not None else self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoders[0],
            "tokenizer": self.tokenizers[0],
            **self.extra_components,
        }
        if self.is_sdxl:
            components["text_encoder_2"] = self.text_encoders[1]
            components["tokenizer_2"] = self.tokenizers[1]
        pipe = self.pipeline_class(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _rebuild_meta_position_ids(module: torch.nn.Module) -> None:
    """Give `position_ids` buffers left on the meta device (non-persistent, so never loaded) real values.

    Modules built on the meta device and loaded with `assign=True` keep such
    buffers as meta tensors, which cannot be moved to a device for training.
    """
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta and name.endswith("position_ids"):
            owner, _, leaf = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            value = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
            sub.register_buffer(leaf, value, persistent=False)


@dataclass
class PreparedBatch:
    """A batch turned into U-Net inputs."""

    noisy: NoisyBatch
    cond: Conditioning
    added: dict[str, torch.Tensor] | None


class DiffusionTask:
    """Shared machinery for tasks that train a U-Net (and maybe text encoders) on captioned images."""

    name = "diffusion"

    def __init__(self, parts: DiffusionParts, loss: LossConfig, *, train_text_encoders: bool = False) -> None:
        self.parts = parts
        self.loss_config = loss
        self.train_text_encoders = train_text_encoders
        self.device = torch.device("cpu")
        self.weight_dtype = torch.float32
        self._latent_cache: dict[int, torch.Tensor] = {}
        self.prediction_type = str(loss.noise.prediction_type or parts.noise_scheduler.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise SdcError(
                f"the model's scheduler predicts {self.prediction_type!r}, which this trainer cannot train "
                f"(it knows {', '.join(PREDICTION_TYPES)}); pass --prediction-type with one of those."
            )
        self.allowed_timesteps = timestep_set(loss.noise.timesteps, parts.noise_scheduler)
        self.parts.vae.requires_grad_(False)
        for encoder in self.parts.text_encoders:
            encoder.requires_grad_(train_text_encoders)

    def check_dataset(self, dataset) -> None:
        """Before the first step: a prepared dataset must hold this U-Net's kind of latents and embeddings."""
        conditioning = getattr(getattr(dataset, "index", None), "conditioning", None)
        if conditioning is not None:
            check_prepared(conditioning, self.parts)
            if self.train_text_encoders:
                raise SdcError(
                    "a prepared dataset holds fixed text embeddings, so the text encoders cannot train on "
                    "it; drop the text-encoder training option or train from the image folder."
                )

    def enable_gradient_checkpointing(self) -> None:
        self.parts.unet.enable_gradient_checkpointing()
        if self.train_text_encoders:
            for encoder in self.parts.text_encoders:
                encoder.gradient_checkpointing_enable()

    # -- device placement -------------------------------------------------

    def move_frozen(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Frozen parts to the device; the VAE stays fp32 when its config says it overflows in half."""
        self.device, self.weight_dtype = device, weight_dtype
        vae_dtype = torch.float32 if getattr(self.parts.vae.config, "force_upcast", False) else weight_dtype
        self.parts.vae.to(device, vae_dtype)
        if not self.train_text_encoders:
            for encoder in self.parts.text_encoders:
                encoder.to(device, weight_dtype)

    # -- inputs -----------------------------------------------------------

    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """VAE latents of the batch's images (scaled), from the cache when latent caching is on.

        A batch from a prepared dataset already holds them (`latents`); the VAE does not run.
        """
        if "latents" in batch:
            return batch["latents"].to(self.device, torch.float32)
        indices = batch["index"].tolist()
        if self.loss_config.cache_latents and all(i in self._latent_cache for i in indices):
            return torch.stack([self._latent_cache[i] for i in indices]).to(self.device)
        vae = self.parts.vae
        latents = vae_latents(vae, batch["pixel_values"].to(self.device, next(vae.parameters()).dtype))
        if self.loss_config.cache_latents:
            for i, latent in zip(indices, latents, strict=True):
                self._latent_cache[i] = latent.cpu()
        return latents

    def encode(self, batch: dict[str, Any]) -> Conditioning:
        """One text-encoder forward for the batch (with gradients only when the encoders train).

        A prepared dataset's batch holds the embeddings; they are used as stored (`check_dataset`
        has refused to train the text encoders on them).
        """
        if "prompt_embeds" in batch:
            pooled = batch.get("pooled")
            return Conditioning(
                batch["prompt_embeds"].to(self.device), None if pooled is None else pooled.to(self.device)
            )
        with torch.set_grad_enabled(self.train_text_encoders and torch.is_grad_enabled()):
            return encode_prompts(
                self.parts.text_encoders, self.parts.tokenizers, batch["captions"], self.device
            )

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> PreparedBatch:
        """Latents, conditioning, noise, timesteps and target for one batch."""
        latents = self.latents(batch)
        cond = self.encode(batch)
        noisy = add_noise(
            self.parts.noise_scheduler, latents, self.loss_config.noise, generator, self.allowed_timesteps
        )
        added = unet_added_conditions(cond, batch, self.device, torch.float32)
        return PreparedBatch(noisy=noisy, cond=cond, added=added)

    def task_loss(self, prediction: torch.Tensor, prepared: PreparedBatch) -> torch.Tensor:
        """The diffusion loss (epsilon or v target; Min-SNR weighted when asked)."""
        return diffusion_loss(
            prediction,
            prepared.noisy.target,
            scheduler=self.parts.noise_scheduler,
            timesteps=prepared.noisy.timesteps,
            snr_gamma=self.loss_config.snr_gamma,
            prediction_type=prepared.noisy.prediction_type,
        )


@torch.no_grad()
def vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled fp32 latents of pixels in [-1, 1]: the distribution's mean (deterministic, so resume is exact).

    The one definition of a training latent: the trainer and `data prepare` both call it.
    """
    latents = vae.encode(pixels).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # Contiguous: the VAE's output can come back channels-last, and a U-Net given another memory
    # layout picks other kernels, so stored and freshly encoded latents would train differently.
    return ((latents - shift) * vae.config.scaling_factor).float().contiguous()


def check_prepared(conditioning: dict[str, Any], parts: DiffusionParts) -> None:
    """Refuse prepared data encoded for another family: its latents or embeddings do not fit this U-Net.

    `conditioning` is what the dataset's index records: latent channels, text width, pooled width.
    """
    config = parts.unet.config
    width, channels = conditioning["text_dim"], conditioning["latent_channels"]
    has_pooled = conditioning.get("pooled_dim") is not None
    wants_pooled = getattr(config, "addition_embed_type", None) == "text_time"
    if width != config.cross_attention_dim or has_pooled != wants_pooled or channels != config.in_channels:
        family = conditioning.get("family", "another model")
        made = f"text embeddings {width} wide{' + pooled' if has_pooled else ''}, {channels}-channel latents"
        needs = (
            f"{config.cross_attention_dim} wide{' + pooled' if wants_pooled else ''}, "
            f"{config.in_channels}-channel latents"
        )
        raise SdcError(
            f"the prepared dataset was encoded for another model family ({family}: {made}) and this U-Net "
            f"needs {needs}; prepare the data again with --model set to this model or its teacher."
        )


def place_teacher(teacher: torch.nn.Module, device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """Move a frozen teacher to the device: half precision on CUDA (bf16 when training in bf16, else fp16),
    fp32 elsewhere, since it only runs forward. Returns the dtype it now runs in."""
    dtype = torch.float32
    if device.type == "cuda":
        dtype = torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16
    teacher.to(device, dtype)
    return dtype


def run_unet(unet, prepared: PreparedBatch, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Call a U-Net on a prepared batch, casting inputs to `dtype` (a half-precision teacher) when given."""
    noisy, hidden = prepared.noisy.noisy_latents, prepared.cond.hidden_states
    added = prepared.added
    if dtype is not None:
        noisy, hidden = noisy.to(dtype), hidden.to(dtype)
        added = None if added is None else {k: v.to(dtype) for k, v in added.items()}
    else:
        hidden = hidden.float()
    kwargs = {"added_cond_kwargs": added} if added is not None else {}
    return unet(noisy, prepared.noisy.timesteps, encoder_hidden_states=hidden, return_dict=False, **kwargs)[0]
