"""Estimated U-Net cost of one denoising step, counted on the meta device.

`torch.utils.flop_counter.FlopCounterMode` counts convolutions, linear
layers and attention matmuls (including `scaled_dot_product_attention`) from
shapes alone, so a full-size SDXL forward on the meta device costs no memory
and about a second. Normalisations and activations are not counted (a few
percent). One FLOP here is one multiply or add: 2 per multiply-accumulate.
"""

from __future__ import annotations

from typing import Any

import torch

from sdcompress.arch.count import meta_unet
from sdcompress.arch.families import Config, Family


def vae_factor(family: Family) -> int:
    """Pixels per latent along a side (the VAE halves per level after the first)."""
    return 2 ** (len(family.vae["block_out_channels"]) - 1)


def latent_size(family: Family) -> int:
    """Latent side length at the family's default resolution."""
    return family.resolution // vae_factor(family)


def added_cond(unet_cfg: Config, family: Family, batch: int, size: int, device: Any = None) -> dict | None:
    """SDXL's `added_cond_kwargs`: a pooled text embedding and the micro-conditioning numbers."""
    if unet_cfg.get("addition_embed_type") != "text_time":
        return None
    pooled = family.text_encoders[-1].config["projection_dim"]
    n_time = (unet_cfg["projection_class_embeddings_input_dim"] - pooled) // unet_cfg[
        "addition_time_embed_dim"
    ]
    pixels = float(size * 2 ** (len(family.vae["block_out_channels"]) - 1))
    values = [pixels, pixels, 0.0, 0.0, pixels, pixels] if n_time == 6 else [pixels, pixels, 0.0, 0.0, 6.0]
    time_ids = torch.tensor([values[:n_time]], device=device).repeat(batch, 1)
    return {"text_embeds": torch.zeros(batch, pooled, device=device), "time_ids": time_ids}


def unet_flops(unet_cfg: Config, family: Family, *, size: int | None = None) -> int:
    """FLOPs of one U-Net forward at batch 1 (classifier-free guidance doubles it) at the default resolution."""
    from torch.utils.flop_counter import FlopCounterMode

    size = size or latent_size(family)
    unet = meta_unet(unet_cfg)
    with torch.device("meta"):
        sample = torch.zeros(1, unet_cfg.get("in_channels", 4), size, size)
        context = torch.zeros(1, 77, unet_cfg["cross_attention_dim"])
        timestep = torch.tensor([500])
        extra = added_cond(unet_cfg, family, 1, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, timestep, context, added_cond_kwargs=extra)
    return int(counter.get_total_flops())
