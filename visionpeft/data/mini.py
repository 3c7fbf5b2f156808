"""Real small image tasks that ship inside installed packages (no download), for the embedded demo.

* ``digits``: scikit-learn's handwritten digits (1,797 images, 8 x 8, 10 classes), upsampled to RGB.
* ``textures``: six texture classes tiled from scikit-image's sample photos (brick, grass, gravel, lunar surface,
  deep-field stars, stained tissue); 64 x 64 tiles in grayscale, the tiles of a split never overlap another's.
* ``faces``: scikit-image's LFW subset (200 images, 25 x 25): 100 faces vs 100 non-face patches - a binary task,
  since that is what the packaged subset holds (no identities).

Splits are fixed and seeded (60 / 20 / 20 per class), so every run sees the same train / val / test images:
digits 1,078 / 359 / 360, textures 228 / 78 / 78, faces 120 / 40 / 40; ``trainval`` is train + val. Notes in
``datasets/mini_tasks.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..registry import DATASETS

SPLITS = ("train", "val", "test", "trainval")  # trainval: train + val (the final stage of a sweep protocol)
FRACTIONS = (0.6, 0.2, 0.2)


class ArrayImages(Dataset):
    """Images held as a uint8 array (N, H, W) or (N, H, W, 3) with labels; items are RGB PIL images."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, classes: list[str], transform: Callable | None = None
    ) -> None:
        self.images, self.targets, self.classes, self.transform = images, [int(y) for y in labels], classes, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


def stratified_split(labels: np.ndarray, split: str, seed: int) -> np.ndarray:
    """Indices of ``split`` in a seeded, per-class 60 / 20 / 20 split (``trainval``: the first two parts)."""
    if split not in SPLITS:
        raise DataError(f"the mini tasks have the splits {', '.join(SPLITS)}, not '{split}'")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        items = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.cumsum([round(f * len(items)) for f in FRACTIONS[:-1]])
        parts = np.split(items, cuts)
        chosen.append(np.concatenate(parts[:2]) if split == "trainval" else parts[SPLITS.index(split)])
    return np.sort(np.concatenate(chosen))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Stretches an image's own range to 0..255."""
    image = image.astype(np.float64)
    lo, hi = image.min(), image.max()
    return ((image - lo) / max(hi - lo, 1e-8) * 255).round().astype(np.uint8)


@DATASETS.register("digits")
def digits(
    split: str, root: str | None = None, transform: Callable | None = None, seed: int = 0, size: int = 32, **_
) -> ArrayImages:
    """scikit-learn's handwritten digits, upsampled from 8 x 8 to ``size`` x ``size``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    index = stratified_split(data.target, split, seed)
    images = np.stack(
        [np.asarray(Image.fromarray(to_uint8(data.images[i])).resize((size, size), Image.BILINEAR)) for i in index]
    )
    return ArrayImages(images, data.target[index], [str(d) for d in range(10)], transform)


TEXTURES = {
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "lunar_surface": "moon",
    "stars": "hubble_deep_field",
    "stained_tissue": "immunohistochemistry",
}


@functools.cache
def texture_photo(name: str) -> np.ndarray:
    """The photograph of texture ``name`` (a key of :data:`TEXTURES`) in grayscale (the mean of its colour
    channels, float64, unscaled), read from scikit-image's data once per process; read-only."""
    import skimage.data

    image = getattr(skimage.data, TEXTURES[name])().astype(np.float64)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=-1)
    image.setflags(write=False)
    return image


def _tiles(image: np.ndarray, tile: int) -> np.ndarray:
    """Non-overlapping ``tile`` x ``tile`` squares of a grayscale photo: (n, tile, tile)."""
    rows, cols = image.shape[0] // tile, image.shape[1] // tile
    grid = image[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile).swapaxes(1, 2)
    return grid.reshape(-1, tile, tile)


@DATASETS.register("textures")
def textures(
    split: str,
    root: str | None = None,
    transform: Callable | None = None,
    seed: int = 0,
    tile: int = 64,
    per_class: int = 64,
    **_,
) -> ArrayImages:
    """Non-overlapping ``tile`` x ``tile`` grayscale tiles, ``per_class`` per texture, split per class."""
    images, labels = [], []
    rng = np.random.default_rng(seed)
    for label, name in enumerate(TEXTURES):
        tiles = _tiles(texture_photo(name), tile)
        tiles = tiles[rng.permutation(len(tiles))[:per_class]]
        images += [to_uint8(t) for t in tiles]
        labels += [label] * len(tiles)
    labels_arr = np.array(labels)
    index = stratified_split(labels_arr, split, seed)
    return ArrayImages(np.stack(images)[index], labels_arr[index], list(TEXTURES), transform)


@DATASETS.register("faces")
def faces(split: str, root: str | None = None, transform: Callable | None = None, seed: int = 0, **_) -> ArrayImages:
    """scikit-image's LFW subset: the first 100 images are faces, the last 100 are not."""
    import skimage.data

    images = skimage.data.lfw_subset()
    labels = np.array([0] * 100 + [1] * 100)
    index = stratified_split(labels, split, seed)
    return ArrayImages(np.stack([to_uint8(im) for im in images[index]]), labels[index], ["face", "non_face"], transform)
