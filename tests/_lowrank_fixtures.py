"""Shared fixtures for the LoRA tests: a tiny base model and a "fine-tuned" copy of it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import LazyTensor
from sdcompress.checkpoint.tiny import tiny_model
from sdcompress.checkpoint.writers import save_diffusers, save_single_file
from sdcompress.lowrank.targets import is_target


def tuned_copy(
    model: Model, *, seed: int = 1, rank: int = 4, noise: float = 1e-3, text: bool = True
) -> Model:
    """Every LoRA-able layer (conv set included) gets a low-rank-plus-noise change."""
    g = torch.Generator().manual_seed(seed)
    components = {}
    for c, sd in model.components.items():
        out = dict(sd)
        if c != "vae" and (text or c == "unet"):
            for key, lt in sd.items():
                if not is_target(c, key, lt.shape, conv=True):
                    continue
                w = lt.load()
                m = w.reshape(w.shape[0], -1)
                r = min(rank, *m.shape)
                delta = torch.randn(m.shape[0], r, generator=g) @ torch.randn(r, m.shape[1], generator=g)
                delta = 0.05 * delta / r + noise * torch.randn(m.shape, generator=g)
                out[key] = LazyTensor.of((m + delta).reshape(w.shape).to(w.dtype))
        components[c] = out
    return dataclasses.replace(model, components=components, ref=model.ref + "-tuned")


def write_pair(tmp: Path, name: str, *, single_file: bool = False, **kw) -> tuple[Path, Path, Model, Model]:
    base = tiny_model(name)
    tuned = tuned_copy(base, **kw)
    save = save_single_file if single_file else save_diffusers
    suffix = ".safetensors" if single_file else ""
    bp, tp = tmp / f"base{suffix}", tmp / f"tuned{suffix}"
    save(base, bp)
    save(tuned, tp)
    return bp, tp, base, tuned
