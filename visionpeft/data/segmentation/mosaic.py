"""``texture-mosaic``: the offline segmentation demo, real pixels with exact labels.

Each image is cut into 2-5 random Voronoi cells (``min_regions`` .. ``max_regions``); each cell shows a different
one of the six texture photographs of :mod:`visionpeft.data.mini` (grayscale, as the ``textures`` task uses them),
copied from a ``size`` x ``size`` window at a random place of that photograph, and is labelled with the texture's
index. Windows of ``train`` and ``val`` lie in the left half of every photograph and windows of ``test`` in the right
half, so no test pixel is seen in training; ``val`` draws from the training half with its own random stream (its
images are new mosaics, not new pixels). Everything is generated in memory from ``seed``: the same options give the
same images. ``provenance[i]`` records, per region of image ``i``, the texture and the window it was copied from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ...errors import DataError
from ...registry import SEGMENTATION_DATASETS
from ..mini import TEXTURES, texture_photo, to_uint8
from .classes import default_palette

SPLIT_SIZES = {"train": 600, "val": 100, "test": 200}
_STREAMS = {"train": 0, "val": 1, "test": 2}  # each split draws from its own random stream of the seed
#: Every Voronoi cell covers at least this share of the image divided by the number of cells (no slivers).
MIN_CELL_SHARE = 0.25


@dataclass(frozen=True)
class Window:
    """Where a region's pixels come from: rows ``top:top+size`` and columns ``left:left+size`` of the photograph
    of ``texture``."""

    texture: str
    top: int
    left: int
    size: int


def source_columns(photo_width: int, split: str) -> tuple[int, int]:
    """The columns [start, stop) of a photograph that ``split`` may copy from: the left half for train / val, the
    right half for test."""
    half = photo_width // 2
    return (half, photo_width) if split == "test" else (0, half)


class TextureMosaic(Dataset):
    """Mosaic images (N, size, size) uint8 grayscale with label maps of the same shape; items are
    ``(RGB PIL image, "L" PIL mask)`` or ``transform(image, mask)``."""

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        provenance: list[list[Window]],
        transform: Callable | None = None,
    ) -> None:
        self.images, self.masks, self.provenance, self.transform = images, masks, provenance, transform
        self.classes = list(TEXTURES)
        self.palette = default_palette(len(self.classes))
        self.ignore_index = 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index]).convert("RGB")
        mask = Image.fromarray(self.masks[index], mode="L")
        return self.transform(image, mask) if self.transform else (image, mask)


def voronoi_cells(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """A (size, size) map of ``count`` Voronoi cells (values 0 .. count-1) around random centres, redrawn until
    every cell covers at least :data:`MIN_CELL_SHARE` / ``count`` of the image."""
    rows, cols = np.mgrid[0:size, 0:size]
    smallest = MIN_CELL_SHARE * size * size / count
    while True:
        centres = rng.uniform(0, size, (count, 2))
        distances = (rows[None] - centres[:, 0, None, None]) ** 2 + (cols[None] - centres[:, 1, None, None]) ** 2
        cells = distances.argmin(axis=0)
        if np.bincount(cells.ravel(), minlength=count).min() >= smallest:
            return cells


def generate(
    split: str, count: int, size: int, seed: int, min_regions: int, max_regions: int
) -> tuple[np.ndarray, np.ndarray, list[list[Window]]]:
    """``count`` mosaics of ``split``: images, label maps and the windows their regions were copied from."""
    names = list(TEXTURES)
    photos = {name: to_uint8(texture_photo(name)) for name in names}
    rng = np.random.default_rng([seed, _STREAMS[split]])
    images = np.empty((count, size, size), np.uint8)
    masks = np.empty((count, size, size), np.uint8)
    provenance = []
    for index in range(count):
        regions = int(rng.integers(min_regions, max_regions + 1))
        labels = rng.choice(len(names), size=regions, replace=False)
        cells = voronoi_cells(rng, size, regions)
        windows = []
        for cell, label in enumerate(labels):
            photo = photos[names[label]]
            start, stop = source_columns(photo.shape[1], split)
            top = int(rng.integers(0, photo.shape[0] - size + 1))
            left = int(rng.integers(start, stop - size + 1))
            inside = cells == cell
            images[index][inside] = photo[top : top + size, left : left + size][inside]
            windows.append(Window(names[label], top, left, size))
        masks[index] = labels[cells]
        provenance.append(windows)
    return images, masks, provenance


@SEGMENTATION_DATASETS.register("texture-mosaic")
def texture_mosaic(
    split: str,
    root: str | None = None,
    transform: Callable | None = None,
    size: int = 64,
    n: int | None = None,
    seed: int = 0,
    min_regions: int = 2,
    max_regions: int = 5,
    **_,
) -> TextureMosaic:
    """The texture mosaic split ``split`` (train / val / test): ``n`` images (default 600 / 100 / 200) of ``size`` x
    ``size`` pixels with ``min_regions`` .. ``max_regions`` regions each. ``root`` is not used (nothing is read).

    Raises:
        DataError: An unknown split, or options no mosaic can satisfy.
    """
    if split not in SPLIT_SIZES:
        raise DataError(f"texture-mosaic has the splits {', '.join(SPLIT_SIZES)}, not '{split}'")
    count = SPLIT_SIZES[split] if n is None else int(n)
    if count < 1:
        raise DataError(f"texture-mosaic needs n >= 1 images per split, got {count}")
    if not 1 <= min_regions <= max_regions <= len(TEXTURES):
        raise DataError(
            f"texture-mosaic needs 1 <= min_regions <= max_regions <= {len(TEXTURES)} (one texture per region), "
            f"got {min_regions} and {max_regions}"
        )
    narrowest = min(min(photo.shape[0], photo.shape[1] // 2) for photo in map(texture_photo, TEXTURES))
    if not 8 <= size <= narrowest:
        raise DataError(f"texture-mosaic size must be between 8 and {narrowest} (half a photograph), got {size}")
    return TextureMosaic(*generate(split, count, size, seed, min_regions, max_regions), transform=transform)
