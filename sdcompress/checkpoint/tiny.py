"""The built-in tiny models: `tiny-sd` and `tiny-sdxl`.

Same topology as SD 1.x and SDXL (levels, block kinds, transformer depths, so
every preset applies), tiny widths, weights drawn from a fixed seed. They are
written once into the user's cache as ordinary diffusers folders, so every
command reads them through the same code path as a real model, offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdcompress.arch.families import get_family
from sdcompress.checkpoint.keymap import text as text_map
from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import lazy_state_dict

TINY_VERSION = 3
SEED = 20240


def cache_dir() -> Path:
    if os.environ.get("SDCOMPRESS_CACHE"):
        return Path(os.environ["SDCOMPRESS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdcompress"


def tiny_model(name: str) -> Model:
    """Build the tiny model in memory (deterministic)."""
    from sdcompress.checkpoint.instantiate import module_from_config

    family = get_family(name)
    gen = torch.Generator().manual_seed(SEED)
    components, configs = {}, {"scheduler": dict(family.scheduler)}
    parts = [("unet", family.unet), ("vae", family.vae)] + [
        (t.component, t.config) for t in family.text_encoders
    ]
    for component, config in parts:
        module = module_from_config(component, config).to_empty(device="cpu")
        tensors = {}
        for key, t in module.state_dict().items():
            if key.endswith("position_ids"):
                continue
            if not t.dtype.is_floating_point:
                tensors[key] = torch.zeros_like(t)
            elif (
                key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight"))
                or ("layer_norm" in key or "norm_out" in key or "group_norm" in key)
                and key.endswith("weight")
            ):
                tensors[key] = torch.ones_like(t)
            elif key.endswith("bias"):
                tensors[key] = torch.zeros_like(t)
            else:
                fan_in = max(1, t[0].numel()) if t.dim() > 1 else t.numel()
                tensors[key] = torch.randn(t.shape, generator=gen) / fan_in**0.5
        sd = lazy_state_dict(tensors)
        components[component] = text_map.clip_to_diffusers(sd) if component.startswith("text") else sd
        configs[component] = dict(config)
    return Model(
        ref=name, path=None, format="diffusers", family=family, components=components, configs=configs
    )


def tiny_model_path(name: str) -> Path:
    """The cached diffusers folder of a tiny model, written on first use."""
    from sdcompress.checkpoint.writers import save_diffusers

    path = cache_dir() / f"{name}-v{TINY_VERSION}"
    if not (path / "model_index.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_diffusers(tiny_model(name), path)
        except Exception:
            if not (path / "model_index.json").is_file():  # another process may have won the race
                raise
    return path
