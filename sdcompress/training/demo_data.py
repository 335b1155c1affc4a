"""Small captioned image sets generated offline, so every training command runs without a download.

No captioned image set ships on the package index, so the demo data is drawn:
coloured shapes on coloured backgrounds with captions that say exactly what is
in the picture ("a red circle on a blue background"). The same seed always gives
the same files. When scikit-image is installed, its bundled public-domain / CC0
photographs (astronaut, chelsea, coffee, rocket) can be added with short captions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw

from sdcompress.checkpoint.atomic import atomic_dir
from sdcompress.errors import SdcError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "ring")
PHOTOS: dict[str, str] = {
    "astronaut": "a photograph of an astronaut",
    "chelsea": "a photograph of a cat",
    "coffee": "a photograph of a cup of coffee",
    "rocket": "a photograph of a rocket on a launch pad",
}

Layout = Literal["kohya", "imagefolder"]


@dataclass(frozen=True)
class DemoSample:
    """One generated picture and the caption that describes it."""

    image: Image.Image
    caption: str
    name: str


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # ring
        width = max(2, (x1 - x0) // 6)
        draw.ellipse(box, outline=fill, width=width)


def shape_sample(index: int, seed: int, size: int) -> DemoSample:
    """Draw picture `index` of the set for `seed`: one shape, one background, a caption naming both."""
    rng = random.Random(seed * 1_000_003 + index)
    names = list(COLOURS)
    background = rng.choice(names)
    colour = rng.choice([c for c in names if c != background])
    shape = rng.choice(SHAPES)
    image = Image.new("RGB", (size, size), COLOURS[background])
    extent = rng.randint(size // 3, (size * 3) // 4)
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    _draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + extent, y0 + extent), COLOURS[colour])
    caption = f"a {colour} {shape} on a {background} background"
    return DemoSample(image=image, caption=caption, name=f"shape_{index:05d}")


def photo_samples(size: int) -> list[DemoSample]:
    """The photographs bundled in scikit-image's wheel (no network); empty when it is not installed."""
    try:
        from skimage import data as skdata
    except ImportError:
        return []
    samples = []
    for name, caption in PHOTOS.items():
        array = getattr(skdata, name)()
        image = Image.fromarray(array).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        samples.append(DemoSample(image=image, caption=caption, name=f"photo_{name}"))
    return samples


def demo_samples(count: int, *, seed: int = 0, size: int = 64, photos: bool = False) -> list[DemoSample]:
    """`count` shape pictures for `seed`, followed by the bundled photographs when asked for."""
    if count < 0:
        raise SdcError(f"--count must be 0 or more, got {count}; pass a positive number of images.")
    if size < 8:
        raise SdcError(f"--size must be at least 8 pixels, got {size}; pass a larger size.")
    samples = [shape_sample(i, seed, size) for i in range(count)]
    if photos:
        extra = photo_samples(size)
        if not extra:
            raise SdcError(
                "the demo photographs need scikit-image; install it with `pip install scikit-image`."
            )
        samples += extra
    if not samples:
        raise SdcError("the demo data set would be empty; pass --count 1 or more.")
    return samples


def write_demo_dataset(
    out: str | Path,
    count: int = 16,
    *,
    seed: int = 0,
    size: int = 64,
    layout: Layout = "kohya",
    photos: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a demo set as a kohya folder (image + .txt) or an imagefolder with metadata.jsonl."""
    if layout not in ("kohya", "imagefolder"):
        raise SdcError(f"unknown demo data layout {layout!r}; use 'kohya' or 'imagefolder'.")
    samples = demo_samples(count, seed=seed, size=size, photos=photos)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        lines = []
        for sample in samples:
            file_name = f"{sample.name}.png"
            sample.image.save(tmp / file_name)
            if layout == "kohya":
                (tmp / f"{sample.name}.txt").write_text(sample.caption + "\n", encoding="utf-8")
            else:
                lines.append(json.dumps({"file_name": file_name, "text": sample.caption}))
        if layout == "imagefolder":
            (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(out)
