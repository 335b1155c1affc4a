"""Full-size random-weight models for the slow tests and the benchmarks, made once and reused.

A random fp16 SD 1.5 is 2.1 GB and an SDXL 6.9 GB; writing them into every
test's temporary folder filled disks (12 GB per test run). Here each one is
written once into the sdcompress cache (`SDCOMPRESS_CACHE`, by default
~/.cache/sdcompress, beside the tiny models), under `random/`, and every test
and benchmark that needs it reads the same copy. Weights come from a seeded
generator, tensor by tensor, so building one needs little memory and the same
name always holds the same bytes. Delete the folder to get the disk back.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import LazyTensor
from sdcompress.checkpoint.tiny import cache_dir

RANDOM_VERSION = 1  # bump when the weights drawn for a name change
FORMATS = ("single-file", "diffusers")


def random_cache_dir() -> Path:
    """Where the random full-size models live (delete it to free the disk; it is rebuilt on use)."""
    return cache_dir() / "random"


def _draw(
    key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """One tensor, seeded by its name: the same bytes whatever order (or how often) it is drawn.

    `device` is where the numbers are drawn (the result is always on the CPU): a GPU draws an SDXL
    in seconds where the CPU's serial generator takes about a minute, but its generator gives other
    bytes, so a GPU-drawn model is cached under its own name.
    """
    if key.endswith("weight") and "norm" in key:
        return torch.ones(shape, dtype=dtype)
    if key.endswith("bias") or len(shape) < 2:
        return torch.zeros(shape, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed * 2**32 + zlib.crc32(key.encode()))
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=gen, device=device) / fan_in**0.5).to(dtype).cpu()


def random_full_model(
    family: str, dtype: torch.dtype = torch.float16, seed: int = 0, draw_device: str = "cpu"
) -> Model:
    """A full-size pipeline whose weights are drawn tensor by tensor as they are written (low memory).

    Norms start at one, biases at zero and weights at 1/sqrt(fan-in), so a forward pass stays
    finite and benchmarks that run the model (prune's scoring, training) time real arithmetic.
    """
    from sdcompress.arch.families import get_family
    from sdcompress.checkpoint.instantiate import module_from_config
    from sdcompress.checkpoint.keymap import text as text_map

    fam = get_family(family)
    parts = [("unet", fam.unet), ("vae", fam.vae)] + [(t.component, t.config) for t in fam.text_encoders]
    components, configs = {}, {"scheduler": dict(fam.scheduler)}
    for name, config in parts:
        module = module_from_config(name, config)  # on the meta device: shapes only
        sd = {
            k: LazyTensor(
                tuple(v.shape), dtype, partial(_draw, f"{name}.{k}", tuple(v.shape), dtype, seed, draw_device)
            )
            for k, v in module.state_dict().items()
            if not k.endswith("position_ids")
        }
        components[name] = text_map.clip_to_diffusers(sd) if name.startswith("text") else sd
        configs[name] = dict(config)
    return Model(
        ref=f"random:{family}",
        path=None,
        format="diffusers",
        family=fam,
        components=components,
        configs=configs,
    )


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """One builder at a time per model: a second test run or benchmark waits instead of writing a copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_random_model(
    family: str, fmt: str = "single-file", *, seed: int = 0, draw_device: str = "cpu"
) -> Path:
    """The cached fp16 random-weight pipeline of `family` (sd1, sd2, sdxl), written on first use.

    `draw_device="cuda"` draws the weights on the GPU (see `_draw`): other bytes, another cache name.
    """
    from sdcompress.checkpoint.writers import save_diffusers, save_single_file

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    drawn = torch.device(draw_device).type
    stem = f"{family}-fp16-seed{seed}-v{RANDOM_VERSION}" + ("" if drawn == "cpu" else f"-{drawn}")
    path = random_cache_dir() / (f"{stem}.safetensors" if fmt == "single-file" else stem)
    done = path.is_file() if fmt == "single-file" else (path / "model_index.json").is_file()
    if done:
        return path
    with _build_lock(path):
        done = path.is_file() if fmt == "single-file" else (path / "model_index.json").is_file()
        if not done:  # the writers publish atomically: a present path is a complete model
            model = random_full_model(family, seed=seed, draw_device=draw_device)
            (save_single_file if fmt == "single-file" else save_diffusers)(model, path, overwrite=True)
    return path
