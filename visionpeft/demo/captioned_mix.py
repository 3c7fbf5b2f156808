"""Captioned 32 px images that ship inside installed packages: the pretraining data of the tiny text-to-image model.

Families (every pixel real, nothing downloaded):

* ``digit``: scikit-learn's handwritten digits, 8 x 8 upsampled ("a handwritten digit three");
* ``texture``: crops of scikit-image's texture photographs ("a photo of gravel");
* ``face``: scikit-image's LFW face subset ("a photo of a face");
* ``photo``: crops of scikit-image's other photographs ("a photo of a cat", "a photo of coffee");
* ``circle``: fill50k-style filled circles in a small palette ("red circle with blue background").

Every image has a *subject* (``digit 3``, ``texture gravel``, ``photo cat``, ``circle``): one label space shared by
the pretraining data and the judge classifier. :data:`HELD_OUT` subjects (digit 7, the brick texture) never enter
pretraining (``exclude`` defaults to them), so learning them later from a few images is a real test.

Splits are fixed for a seed: digits and faces per class 60 / 20 / 20 (as :mod:`.mini`), textures by disjoint
horizontal bands of each photo (60 / 20 / 20 of its height), photos and circles by split-specific seeds.
``split="all"`` is the union (what pretraining uses).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..data.mini import FRACTIONS, SPLITS, stratified_split, to_uint8
from ..errors import DataError
from ..registry import DATASETS

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: texture word -> scikit-image sample
TEXTURES = {
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "moon surface": "moon",
    "stars": "hubble_deep_field",
    "stained tissue": "immunohistochemistry",
}
#: caption noun -> scikit-image sample
PHOTOS = {
    "cat": "chelsea",
    "coffee": "coffee",
    "astronaut": "astronaut",
    "rocket": "rocket",
    "coins": "coins",
    "clock": "clock",
}
#: a small palette, so that 32 px circles and their captions are learnable in minutes
CIRCLE_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
#: every subject, in label order: the judge's classes
SUBJECTS = (
    [f"digit {d}" for d in range(10)]
    + [f"texture {t}" for t in TEXTURES]
    + ["face"]
    + [f"photo {p}" for p in PHOTOS]
    + ["circle"]
)
HELD_OUT = ("digit 7", "texture brick")
ALL_SPLITS = (*SPLITS, "all")


def digit_prompt(digit: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def subject_prompt(subject: str) -> str:
    """The pretraining caption of a subject (circles have per-image colour captions; this is their generic one)."""
    family, _, name = subject.partition(" ")
    if family == "digit":
        return digit_prompt(int(name))
    if family in ("texture", "photo"):
        return f"a photo of {name}"
    if family == "face":
        return "a photo of a face"
    return "red circle with blue background"


class CaptionedImages(Dataset):
    """uint8 images (N, S, S, 3) with captions and subject labels; items are ``(PIL image, label)``, the caption
    of item ``i`` is ``captions[i]`` (:meth:`item` gives both)."""

    def __init__(
        self, images: np.ndarray, captions: list[str], labels: list[int], transform: Callable | None = None
    ) -> None:
        self.images, self.captions, self.targets, self.transform = images, captions, labels, transform
        self.classes = list(SUBJECTS)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]

    def subjects(self) -> set[str]:
        return {SUBJECTS[label] for label in self.targets}


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.asarray(Image.fromarray(image[..., :3]).resize((size, size), Image.BICUBIC))


def _digits(split: str, size: int, seed: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    for i in stratified_split(data.target, split, seed):
        image = Image.fromarray(to_uint8(data.images[i])).resize((size, size), Image.BILINEAR)
        digit = int(data.target[i])
        yield _resize(np.asarray(image), size), digit_prompt(digit), f"digit {digit}"


def _crops(
    image: np.ndarray,
    count: int,
    rows: tuple[int, int],
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
):
    """``count`` random square crops whose rows lie in ``rows``, side ``scale`` x the band's usable side."""
    top, bottom = rows
    side_max = min(bottom - top, image.shape[1])
    for _ in range(count):
        side = max(8, int(side_max * rng.uniform(*scale)))
        y = int(rng.integers(top, bottom - side + 1))
        x = int(rng.integers(0, image.shape[1] - side + 1))
        yield _resize(image[y : y + side, x : x + side], size)


def _band(height: int, split: str) -> tuple[int, int]:
    """Rows of ``split``'s band of an image (train: top 60%, val: next 20%, test: last 20%; all: everything)."""
    if split == "all":
        return 0, height
    edges = np.round(np.cumsum([0, *FRACTIONS]) * height).astype(int)
    i = SPLITS.index(split)
    return int(edges[i]), int(edges[i + 1])


def _textures(split: str, size: int, seed: int, per_texture: int):
    import skimage.data

    rng = np.random.default_rng([seed, ALL_SPLITS.index(split), 1])
    count = per_texture if split in ("train", "all") else max(1, per_texture // 3)
    for name, source in TEXTURES.items():
        image = getattr(skimage.data, source)()
        for crop in _crops(image, count, _band(image.shape[0], split), rng, size, (0.15, 0.35)):
            yield crop, f"a photo of {name}", f"texture {name}"


def _faces(split: str, size: int, seed: int):
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    labels = np.zeros(100, dtype=int)
    indices = np.arange(100) if split == "all" else stratified_split(labels, split, seed)
    for i in indices:
        face = _resize(to_uint8(faces[i]), size)
        yield face, "a photo of a face", "face"
        yield face[:, ::-1].copy(), "a photo of a face", "face"


def _photos(split: str, size: int, seed: int, per_photo: int):
    import skimage.data

    rng = np.random.default_rng([seed, ALL_SPLITS.index(split), 2])
    count = per_photo if split in ("train", "all") else max(1, per_photo // 3)
    for name, source in PHOTOS.items():
        image = getattr(skimage.data, source)()
        for crop in _crops(image, count, (0, image.shape[0]), rng, size, (0.6, 1.0)):
            yield crop, f"a photo of {name}", f"photo {name}"


def circle_image(fill: str, background: str, centre: tuple[int, int], radius: int, size: int) -> np.ndarray:
    """A ``fill`` disc on a ``background`` square (matplotlib colour names), as fill50k draws it."""
    from matplotlib.colors import to_rgb
    from PIL import ImageDraw

    rgb = {name: tuple(round(255 * c) for c in to_rgb(name)) for name in (fill, background)}
    image = Image.new("RGB", (size, size), rgb[background])
    cx, cy = centre
    ImageDraw.Draw(image).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=rgb[fill])
    return np.asarray(image)


def _circles(split: str, size: int, seed: int, count: int):
    rng = np.random.default_rng([seed, ALL_SPLITS.index(split), 3])
    count = count if split in ("train", "all") else max(1, count // 3)
    for _ in range(count):
        fill, background = (CIRCLE_COLOURS[j] for j in rng.choice(len(CIRCLE_COLOURS), size=2, replace=False))
        radius = int(rng.integers(size // 6, size // 3))
        centre = tuple(int(rng.integers(radius, size - radius)) for _ in range(2))
        yield (
            circle_image(fill, background, centre, radius, size),
            f"{fill} circle with {background} background",
            "circle",
        )


def captioned_mix(
    split: str = "all",
    size: int = 32,
    seed: int = 0,
    exclude: Iterable[str] = HELD_OUT,
    per_texture: int = 160,
    per_photo: int = 80,
    circles: int = 800,
    max_per_subject: int | None = None,
) -> CaptionedImages:
    """The captioned images of ``split`` without the ``exclude``d subjects (default: the held-out ones); at most
    ``max_per_subject`` images of each subject (the first ones) when set (small test runs)."""
    if split not in ALL_SPLITS:
        raise DataError(f"the captioned mix has the splits {', '.join(ALL_SPLITS)}, not '{split}'")
    exclude = set(exclude)
    unknown = exclude - set(SUBJECTS)
    if unknown:
        raise DataError(f"unknown subject(s) {sorted(unknown)}; the subjects are {', '.join(SUBJECTS)}")
    images, captions, labels = _all_subjects(split, size, seed, per_texture, per_photo, circles)
    keep, counts = [], {}
    for i, label in enumerate(labels):
        counts[label] = counts.get(label, 0) + 1
        if SUBJECTS[label] not in exclude and (max_per_subject is None or counts[label] <= max_per_subject):
            keep.append(i)
    return CaptionedImages(images[keep], [captions[i] for i in keep], [labels[i] for i in keep])


@functools.lru_cache(maxsize=8)
def _all_subjects(
    split: str, size: int, seed: int, per_texture: int, per_photo: int, circles: int
) -> tuple[np.ndarray, tuple[str, ...], tuple[int, ...]]:
    """Every subject's images of a split (built once per process: the builders decode and resize photos)."""
    parts = ("train", "val", "test")  # the disjoint splits ("trainval" repeats two of them)
    digits = [x for s in parts for x in _digits(s, size, seed)] if split == "all" else _digits(split, size, seed)
    sources = [
        digits,
        _textures(split, size, seed, per_texture),
        _faces(split, size, seed),
        _photos(split, size, seed, per_photo),
        _circles(split, size, seed, circles),
    ]
    items = [item for source in sources for item in source]
    images = np.stack([image for image, _, _ in items])
    images.setflags(write=False)  # shared by every caller
    return images, tuple(c for _, c, _ in items), tuple(SUBJECTS.index(s) for _, _, s in items)


@DATASETS.register("captioned_mix")
def captioned_mix_dataset(
    split: str, root: str | None = None, transform: Callable | None = None, exclude: Iterable[str] = (), **options
) -> CaptionedImages:
    """Registered form (for classifiers such as the judge): by default *all* subjects, held-out ones included."""
    dataset = captioned_mix(split, exclude=exclude, **options)
    dataset.transform = transform
    return dataset
