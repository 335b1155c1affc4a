"""Rendering prompts with a model, seed by seed, the same way for every model compared.

A U-Net-only model (what `prune` writes) borrows the teacher's VAE, text
encoders and scheduler, exactly as `distill` pairs them. Each image has its own
CPU generator seeded with its seed, so an image does not depend on its batch or
on the device's random stream. The pipeline stops at the latent; we decode it
ourselves, so the cache keeps both what the U-Net made (for latent MSE) and the
picture (for PSNR, SSIM, CLIP and FID).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.sampling import OwnSampling, own_sampling
from sdcompress.choices import Sampler
from sdcompress.errors import SdcError
from sdcompress.evaluation.generation_cache import GenerationSettings, ModelCache, path_fingerprint

SCHEDULER_CLASSES = {
    Sampler.PNDM: "PNDMScheduler",
    Sampler.DDIM: "DDIMScheduler",
    Sampler.EULER: "EulerDiscreteScheduler",
    Sampler.DPM: "DPMSolverMultistepScheduler",
    Sampler.LCM: "LCMScheduler",
    Sampler.TCD: "TCDScheduler",
}


@dataclass
class Candidate:
    """A model to render: what the user typed, the pipeline's weights, and its cache fingerprint."""

    ref: str
    model: Model
    fingerprint: str
    borrowed: bool  # components other than the U-Net come from the teacher
    own: OwnSampling = field(default_factory=OwnSampling)  # how the model itself says it is sampled


def candidate(ref: str, teacher: Model | None, allow_pickle: bool = False) -> Candidate:
    """Load `ref`; a U-Net-only model gets the teacher's other components (and needs a teacher)."""
    from sdcompress.checkpoint.resolve import load_model

    model = load_model(ref, allow_pickle=allow_pickle)
    fingerprint = path_fingerprint(model.path, model.ref)
    own = own_sampling(model.path, model.configs.get("scheduler", {}).get("_class_name"))
    if not model.unet_only:
        return Candidate(ref=ref, model=model, fingerprint=fingerprint, borrowed=False, own=own)
    if teacher is None:
        raise SdcError(f"{ref} holds only a U-Net; give --teacher so its VAE and text encoders can be used.")
    if teacher.family.topology != model.family.topology:
        raise SdcError(
            f"{ref} is a {model.family.title} U-Net but the teacher is {teacher.family.title}; "
            "give the teacher it was pruned from."
        )
    combined = teacher.with_unet(model.components["unet"], model.configs["unet"], ref=model.ref)
    teacher_print = path_fingerprint(teacher.path, teacher.ref)
    return Candidate(ref=ref, model=combined, fingerprint=fingerprint + teacher_print, borrowed=True, own=own)


def scheduler_for(config: dict[str, Any], sampler: Sampler) -> Any:
    """The scheduler images are rendered with: the one `config` describes, or `sampler`'s class on it."""
    import diffusers

    name = config["_class_name"] if sampler == Sampler.MODEL else SCHEDULER_CLASSES[sampler]
    return getattr(diffusers, name).from_config(config)


def planned_timesteps(
    config: dict[str, Any], sampler: Sampler, steps: int, ref: str
) -> tuple[str, list[int]]:
    """The scheduler class and the timesteps `steps` steps visit, as the pipeline will set them.

    Computed from the config alone (no weights), so a cached model reports them too, and a step count
    the scheduler cannot sample (LCM beyond its grid) is one sentence before anything is rendered.
    """
    scheduler = scheduler_for(config, sampler)
    try:
        scheduler.set_timesteps(steps)
    except ValueError as e:
        raise SdcError(
            f"{ref}: its {type(scheduler).__name__} cannot sample {steps} steps ({e}); give fewer, "
            f"e.g. {ref}@steps=4."
        ) from None
    return type(scheduler).__name__, [int(t) for t in scheduler.timesteps]


def build_pipeline(model: Model, sampler: Sampler, dtype: torch.dtype, device: torch.device) -> Any:
    """The model's diffusers pipeline on `device`, with the chosen scheduler and a VAE that decodes safely."""
    from sdcompress.checkpoint.instantiate import build_pipeline as build

    pipe = build(model, dtype=dtype, device=str(device))
    if sampler != Sampler.MODEL:
        pipe.scheduler = scheduler_for(pipe.scheduler.config, sampler)
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents (pipeline output, scaled) -> uint8 images (N, 3, H, W) on the CPU."""
    vae = pipe.vae
    x = latents.to(dtype=next(vae.parameters()).dtype) / vae.config.scaling_factor
    images = vae.decode(x, return_dict=False)[0]
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def render(
    pipe: Any, prompts: list[str], seeds: list[int], settings: GenerationSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: latents (N, C, h, w) in float32 on the CPU and uint8 images (N, 3, H, W)."""
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    latents = pipe(
        prompt=prompts,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        generator=generators,
        height=settings.resolution,
        width=settings.resolution,
        output_type="latent",
    ).images
    return latents.float().cpu(), decode(pipe, latents)


def fill_cache(
    cache: ModelCache,
    pipe_factory: Callable[[], Any],
    pairs: list[tuple[str, int]],
    batch_size: int,
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[int, float]:
    """Generate every (prompt, seed) the cache lacks, batch by batch.

    Returns how many images were generated and the seconds the pipeline calls
    took (loading and writing excluded). The pipeline is built only when
    something is missing, so a fully cached model costs no load at all. One
    untimed one-step image warms the pipeline first: the first call pays for
    lazy initialisation, and the first model rendered (the teacher) would
    otherwise carry the process's too.
    """
    todo = cache.missing(pairs)
    if not todo:
        return 0, 0.0
    pipe = pipe_factory()
    render(pipe, [todo[0][0]], [todo[0][1]], replace(cache.settings, steps=1))
    seconds = 0.0
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        began = time.perf_counter()
        latents, images = render(pipe, [p for p, _ in batch], [s for _, s in batch], cache.settings)
        seconds += time.perf_counter() - began  # render returns CPU tensors: the device is done
        for (prompt, seed), latent, image in zip(batch, latents, images, strict=True):
            cache.put(prompt, seed, latent, image)
        on_batch(len(batch))
    return len(todo), seconds
