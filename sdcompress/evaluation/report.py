"""The pictures an eval leaves behind: the prompt x model grid and the speed/quality plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from sdcompress.checkpoint.atomic import atomic_file
from sdcompress.evaluation.generation_cache import ModelCache
from sdcompress.evaluation.grid import comparison_grid
from sdcompress.evaluation.plot import Point, speed_quality_plot


def write_grid(path: Path, caches: list[ModelCache], evals: list[Any], pairs: list[tuple[str, int]]) -> Path:
    rows = []
    for pair in pairs:
        row = []
        for cache in caches:
            with Image.open(cache.image_path(*pair)) as im:
                row.append(im.convert("RGB"))
        rows.append(row)
    grid = comparison_grid(rows, [p for p, _ in pairs], [grid_label(e) for e in evals])
    with atomic_file(path, overwrite=True) as tmp:
        grid.save(tmp, format="PNG")
    return path


def grid_label(e: Any) -> str:
    """The model's name, then how it was sampled: `4 steps, g 0, LCM` (scheduler class sans "Scheduler")."""
    if e.steps is None:
        return e.ref
    scheduler = (e.scheduler or "").removesuffix("Scheduler")
    return f"{e.ref}\n{e.steps} steps, g {e.guidance:g}, {scheduler}"


def plot_score(e: Any) -> tuple[str, float | None]:
    """The score a model is plotted by: CLIP score, else FID, else SSIM to the teacher (PSNR can be inf)."""
    if e.clip_score is not None:
        return "CLIP score", e.clip_score
    if e.fid is not None:
        return "FID", e.fid
    if e.agreement is not None:
        return "SSIM to the teacher", e.agreement["ssim"]
    return "", None


def write_plot(path: Path, evals: list[Any]) -> Path | None:
    """One point per model with both a speed and a score; None when fewer than one such model."""
    points, name = [], ""
    for e in evals:
        name, score = plot_score(e)
        if e.seconds_per_image is not None and score is not None:
            points.append(Point(e.ref, e.seconds_per_image, score))
    if not points:
        return None
    image = speed_quality_plot(points, name, "speed and quality")
    with atomic_file(path, overwrite=True) as tmp:
        image.save(tmp, format="PNG")
    return path
