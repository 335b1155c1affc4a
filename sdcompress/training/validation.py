"""Validation images: fixed prompts and seeds, rendered with the current weights, saved as one grid."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from PIL import Image

from sdcompress.training.config import ValidationConfig


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into rows of `columns`."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def render_grid(pipe, config: ValidationConfig, device: torch.device, resolution: int) -> Image.Image:
    """One row per prompt, one column per seed; the same seeds every time so grids compare across steps."""
    pipe.to(device)
    images = []
    autocast = contextlib.nullcontext()
    if device.type == "cuda":
        autocast = torch.autocast(device.type, dtype=torch.float16)
    elif pipe.unet.dtype == torch.bfloat16:
        # CPU training in bf16 leaves the frozen U-Net in bf16 beside fp32 parts (the text encoders of
        # embedding training, LoRA adapters); autocast makes the pipeline's mixed dtypes meet.
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    size = config.resolution or resolution
    with torch.no_grad(), autocast:
        for prompt in config.prompts:
            for seed in config.seeds:
                generator = torch.Generator(device="cpu").manual_seed(seed)
                result = pipe(
                    prompt,
                    num_inference_steps=config.steps,
                    guidance_scale=config.guidance_scale,
                    generator=generator,
                    height=size,
                    width=size,
                )
                images.append(result.images[0])
    return image_grid(images, columns=len(config.seeds))


def save_grid(grid: Image.Image, folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.png"
    grid.save(path)
    return path
