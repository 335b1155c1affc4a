"""Speed beside quality: seconds per image (from `bench --json`) against a score, one point per model.

Drawn with PIL (already a dependency through diffusers) rather than matplotlib:
a scatter with axes, ticks and labels is a few dozen lines, and the plot is
then always available, not only with an extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

SIZE = (720, 480)
MARGIN = (70, 30, 30, 50)  # left, top, right, bottom
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass
class Point:
    label: str
    seconds_per_image: float
    score: float


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * 0.1 or abs(high) * 0.1 or 1.0
    return low - pad, high + pad


def speed_quality_plot(points: list[Point], score_name: str, title: str) -> Image.Image:
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    draw.rectangle((left, top, right, bottom), outline="black")
    x_low, x_high = _span([p.seconds_per_image for p in points])
    y_low, y_high = _span([p.score for p in points])

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_low) / (x_high - x_low) * (right - left),
            bottom - (y - y_low) / (y_high - y_low) * (bottom - top),
        )

    for k in range(5):
        x = x_low + (x_high - x_low) * k / 4
        y = y_low + (y_high - y_low) * k / 4
        px, _ = at(x, y_low)
        _, py = at(x_low, y)
        draw.line((px, bottom, px, bottom + 4), fill="black")
        draw.text((px - 15, bottom + 8), f"{x:.3g}", fill="black", font=font)
        draw.line((left - 4, py, left, py), fill="black")
        draw.text((4, py - 6), f"{y:.4g}", fill="black", font=font)
    draw.text(((left + right) // 2 - 50, SIZE[1] - 18), "seconds per image", fill="black", font=font)
    draw.text((left, 8), f"{title}: {score_name}", fill="black", font=font)
    for i, p in enumerate(points):
        x, y = at(p.seconds_per_image, p.score)
        colour = COLOURS[i % len(COLOURS)]
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
        draw.text((x + 8, y - 6), p.label, fill=colour, font=font)
    return image
