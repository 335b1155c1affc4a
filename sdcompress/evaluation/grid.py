"""The side-by-side grid: one row per prompt, one column per model, labelled, as one PNG."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128  # tiny test models render 64 px: scaled up so the labels fit
HEADER_LINES = 4  # a model's name in two lines, how it was sampled in two more
HEADER = 8 + 12 * HEADER_LINES
PROMPT_WIDTH = 180


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int, lines: int) -> None:
    """`text` wrapped to `width`, at most `lines` lines; each part after a newline starts a new line."""
    font = ImageFont.load_default()
    chars = max(8, width // 7)
    parts = text.split("\n")
    share = max(1, lines // len(parts))
    wrapped = [line for part in parts for line in textwrap.wrap(part, chars)[:share]][:lines] or [""]
    for i, line in enumerate(wrapped):
        draw.text((xy[0] + 4, xy[1] + 4 + 12 * i), line, fill="black", font=font)


def comparison_grid(rows: list[list[Image.Image]], prompts: list[str], models: list[str]) -> Image.Image:
    """`rows[i][j]` is prompt i rendered by model j; all images the same size per column or not.

    A model's label may carry a second part after a newline (how it was sampled), drawn below its name.
    """
    cell = max(MIN_CELL, max(im.width for row in rows for im in row))
    width = PROMPT_WIDTH + cell * len(models)
    height = HEADER + cell * len(rows)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(models):
        _label(draw, (PROMPT_WIDTH + j * cell, 0), name, cell, HEADER_LINES)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        top = HEADER + i * cell
        _label(draw, (0, top), prompt, PROMPT_WIDTH, cell // 12 - 1)
        for j, image in enumerate(row):
            tile = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (PROMPT_WIDTH + j * cell, top))
    return grid
