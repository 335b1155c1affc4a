"""Generated images on disk, keyed by (model fingerprint, prompt, seed, settings).

Each model + settings pair gets one folder named by a hash of both; inside it
one PNG and one latent file per (prompt, seed). A PNG is written last and
atomically, so its presence means the pair is complete: adding a model to a
comparison, or rerunning an interrupted eval, generates only what is missing.
Each folder is also a plain image folder that external FID tools can read.

A model's fingerprint is cheap on purpose (hashing GBs of weights would cost
more than many generations): every file's relative path, size and
modification time. Our writers replace files atomically, so retraining into a
folder changes its fingerprint; copying a model (a new mtime) only costs a
regeneration, never a wrong image.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdcompress.checkpoint.atomic import atomic_file

SETTINGS_FILE = "settings.json"
TIMING_FILE = "timing.json"  # pipeline seconds and images rendered into the folder, over all runs


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the model, prompt and seed that changes a generated image."""

    steps: int
    guidance: float
    scheduler: str
    resolution: int
    dtype: str
    device_type: str


def path_fingerprint(path: Path | None, ref: str) -> str:
    """A hash of a model's files (relative path, size, mtime); the reference itself for in-memory models."""
    digest = hashlib.sha256()
    if path is None:
        digest.update(ref.encode())
        return digest.hexdigest()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        stat = f.stat()
        name = f.name if f == path else str(f.relative_to(path))
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def item_name(prompt: str, seed: int) -> str:
    return f"{hashlib.sha256(prompt.encode()).hexdigest()[:20]}-s{seed}"


@dataclass
class CachedItem:
    latent: torch.Tensor  # (C, h, w), float32
    image: torch.Tensor  # (3, H, W), uint8


class ModelCache:
    """The folder of one model's images under one set of settings."""

    def __init__(self, root: Path, fingerprint: str, settings: GenerationSettings, label: str):
        key = hashlib.sha256(
            json.dumps({"model": fingerprint, "settings": asdict(settings)}, sort_keys=True).encode()
        ).hexdigest()[:16]
        self.folder = root / key
        self.key = key
        self.label = label
        self.settings = settings

    def _paths(self, prompt: str, seed: int) -> tuple[Path, Path]:
        name = item_name(prompt, seed)
        return self.folder / f"{name}.png", self.folder / f"{name}.latent.safetensors"

    def has(self, prompt: str, seed: int) -> bool:
        png, latent = self._paths(prompt, seed)
        return png.is_file() and latent.is_file()

    def missing(self, pairs: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return [pair for pair in pairs if not self.has(*pair)]

    def put(self, prompt: str, seed: int, latent: torch.Tensor, image: torch.Tensor) -> None:
        """Store one generation: the latent first, the PNG (the completion mark) last."""
        self.folder.mkdir(parents=True, exist_ok=True)
        settings = self.folder / SETTINGS_FILE
        if not settings.exists():
            with atomic_file(settings, overwrite=True) as tmp:
                tmp.write_text(json.dumps({"model": self.label, **asdict(self.settings)}, indent=2))
        png, latent_path = self._paths(prompt, seed)
        with atomic_file(latent_path, overwrite=True) as tmp:
            save_file({"latent": latent.detach().float().cpu().contiguous()}, str(tmp))
        with atomic_file(png, overwrite=True) as tmp:
            Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")

    def add_timing(self, seconds: float, images: int) -> None:
        """Add one run's pipeline seconds for `images` new images to the folder's totals.

        Kept beside the images so a rerun that renders nothing still reports the model's seconds per
        image (same settings, dtype and device type: the folder's key says so).
        """
        total, count = self._timing()
        with atomic_file(self.folder / TIMING_FILE, overwrite=True) as tmp:
            tmp.write_text(
                json.dumps({"seconds": total + seconds, "images": count + images}), encoding="utf-8"
            )

    def seconds_per_image(self) -> float | None:
        """Pipeline seconds per image over every image rendered into this folder (None: none timed)."""
        total, count = self._timing()
        return total / count if count else None

    def _timing(self) -> tuple[float, int]:
        try:
            data = json.loads((self.folder / TIMING_FILE).read_text(encoding="utf-8"))
            seconds, images = float(data["seconds"]), int(data["images"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0, 0  # no timing yet, or an unreadable one: timed afresh
        return (seconds, images) if seconds >= 0 and images > 0 else (0.0, 0)

    def get(self, prompt: str, seed: int) -> CachedItem:
        png, latent_path = self._paths(prompt, seed)
        latent = load_file(str(latent_path))["latent"]
        with Image.open(png) as im:
            image = torch.from_numpy(_rgb_array(im)).permute(2, 0, 1).contiguous()
        return CachedItem(latent=latent, image=image)

    def image_path(self, prompt: str, seed: int) -> Path:
        return self._paths(prompt, seed)[0]

    def stack(self, pairs: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (N, C, h, w) and uint8 images (N, 3, H, W) of these pairs, in order."""
        items = [self.get(*pair) for pair in pairs]
        return torch.stack([i.latent for i in items]), torch.stack([i.image for i in items])


def _rgb_array(im: Image.Image) -> Any:
    import numpy as np

    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
