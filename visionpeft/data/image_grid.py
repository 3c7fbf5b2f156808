"""One picture of rows of equally sized images: cells enlarged with nearest-neighbour (a 32 px sample stays sharp
squares instead of a blur), a gap between cells and a margin around them on a white background."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

WHITE = (255, 255, 255)


def scale_for(side: int, min_cell: int = 128) -> int:
    """The whole-number enlargement that makes a cell of ``side`` px at least ``min_cell`` px (1 for big images)."""
    return max(1, math.ceil(min_cell / max(1, side)))


def image_grid(rows: Sequence[Sequence[Image.Image]], scale: int = 1, gap: int = 0, margin: int = 0) -> Image.Image:
    """Rows of images (all of one size) as one RGB picture, each image ``scale`` x enlarged (nearest), ``gap`` px
    of white between cells and ``margin`` px of white around them; a short row leaves its last cells white.

    Raises:
        ValueError: No image, or images of different sizes.
    """
    images = [image for row in rows for image in row]
    if not images:
        raise ValueError("an image grid needs at least one image")
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise ValueError(f"the images of a grid must share one size; got {sorted({i.size for i in images})}")
    cell_w, cell_h = width * scale, height * scale
    cols = max(len(row) for row in rows)
    picture = Image.new(
        "RGB",
        (2 * margin + cols * cell_w + (cols - 1) * gap, 2 * margin + len(rows) * cell_h + (len(rows) - 1) * gap),
        WHITE,
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            cell = image.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
            picture.paste(cell, (margin + c * (cell_w + gap), margin + r * (cell_h + gap)))
    return picture
