"""FID: the Fréchet distance between Inception feature statistics of generated and reference images.

The feature network is a TorchScript Inception that takes float images in
[0, 255] at any size and returns 2048 pool features with
`return_features=True`: the convention of the TF-ported Inception
(`inception-2015-12-05.pt`) that clean-fid and StyleGAN's metrics use. Loading
TorchScript needs only torch, so FID needs no extra package, and the file comes
from a local path or the Hub (`weights.hub_file`), never from a URL at import
time as clean-fid and pytorch-fid do. Tests pass a tiny scripted network with
the same call convention.

Both image sets are centre-cropped to a square and resized to `resolution`
with PIL bicubic first (BK-SDM's protocol: 256 px). The Fréchet distance is
computed here in float64 with torch's symmetric eigendecomposition: scipy's
`sqrtm` is not in the fixed stack, and the eigen form stays real and stable
for the rank-deficient covariances of small sets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sdcompress.errors import SdcError
from sdcompress.evaluation.protocol import FID_RESOLUTION
from sdcompress.evaluation.weights import hub_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class FeatureStats:
    mean: torch.Tensor  # (D,) float64
    cov: torch.Tensor  # (D, D) float64
    count: int


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a^1/2 S_b S_a^1/2))."""
    root_a = _sqrt_psd(a.cov)
    middle = root_a @ b.cov @ root_a
    middle = (middle + middle.T) / 2
    trace_root = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    value = (a.mean - b.mean).pow(2).sum() + a.cov.trace() + b.cov.trace() - 2 * trace_root
    return max(float(value), 0.0)


def statistics(features: torch.Tensor) -> FeatureStats:
    """Mean and (unbiased) covariance of features (N, D)."""
    if features.shape[0] < 2:
        raise SdcError("FID needs at least 2 images in each set; use more prompts or reference images.")
    x = features.double()
    return FeatureStats(mean=x.mean(0), cov=torch.cov(x.T), count=int(x.shape[0]))


def square_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square, then resize with PIL bicubic."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return image


def reference_images(folder: Path) -> list[Path]:
    """The image files of a reference folder (recursively), sorted; an empty or missing folder is an error."""
    if not folder.is_dir():
        raise SdcError(f"--fid-reference {folder} is not a folder; give a folder of reference images.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise SdcError(f"--fid-reference {folder} holds {len(files)} image(s); FID needs at least 2.")
    return files


class InceptionFeatures:
    """A TorchScript feature network and the resizing that goes with it."""

    def __init__(self, network: torch.jit.ScriptModule, device: torch.device, resolution: int):
        self.network = network.to(device).eval()
        self.device = device
        self.resolution = resolution

    @classmethod
    def load(cls, ref: str, device: torch.device, resolution: int = FID_RESOLUTION) -> InceptionFeatures:
        path = hub_file(ref, "FID Inception", "--fid-model")
        try:
            network = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise SdcError(
                f"--fid-model {ref} is not a TorchScript feature network; give inception-2015-12-05.pt "
                "(see docs/eval.md)."
            ) from e
        return cls(network, device, resolution)

    def _tensor(self, images: list[Image.Image]) -> torch.Tensor:
        import numpy as np

        arrays = [np.asarray(square_resize(im, self.resolution), dtype=np.uint8) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        x = self._tensor(images).to(self.device)
        return self.network(x, return_features=True).float().flatten(1).cpu()

    def stats_of(self, images: Iterator[Image.Image], batch_size: int = 32) -> FeatureStats:
        chunks, batch = [], []
        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                chunks.append(self.features(batch))
                batch = []
        if batch:
            chunks.append(self.features(batch))
        return statistics(torch.cat(chunks))


def open_images(paths: list[Path]) -> Iterator[Image.Image]:
    for path in paths:
        with Image.open(path) as im:
            yield im.convert("RGB")
