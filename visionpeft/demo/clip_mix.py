"""The tiny CLIP's data: the captioned mix's real 32 px images under CLIP class names, and colour-pair circles.

Two label spaces (dataset ``clip_mix``, option ``subset``):

* ``subjects``: 23 classes, the captioned mix's subjects but the circle (:data:`SUBJECT_NAMES`: "handwritten digit
  three", "gravel texture", "face", "cat", ...), with its fixed splits (:func:`.captioned_mix.captioned_mix`);
* ``circles``: 56 classes, one per (fill, background) colour pair of :data:`.captioned_mix.CIRCLE_COLOURS`
  ("red circle on a blue background"), drawn as fill50k draws them, per pair and split from their own seeds.

Held out of pretraining: the subjects of :data:`HELD_OUT_SUBJECTS` (digit 7, the brick texture: their names'
words never appear in a caption, so zero-shot on them is expected near chance) and the 16 colour pairs of
:data:`HELD_OUT_PAIRS` (every colour twice as a fill and twice as a background among them, so all their words were
seen, only never together: zero-shot on them asks whether the model composes). Pretraining reads the train split
only; validation and test images are never seen. Captions are a class name in one of :data:`TEMPLATES`, drawn at
every step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..registry import DATASETS
from .captioned_mix import CIRCLE_COLOURS, DIGIT_WORDS, PHOTOS, SUBJECTS, TEXTURES, captioned_mix, circle_image

#: pretraining caption templates; the first is the project's single zero-shot template, all of them its ensemble
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "an image of a {}.",
    "a cropped photo of the {}.",
    "a small photo of the {}.",
    "{}.",
)
#: captioned-mix subject -> CLIP class name (the circle subject is replaced by the colour-pair classes)
SUBJECT_NAMES = {
    **{f"digit {d}": f"handwritten digit {DIGIT_WORDS[d]}" for d in range(10)},
    **{f"texture {t}": f"{t} texture" for t in TEXTURES},
    "face": "face",
    **{f"photo {p}": p for p in PHOTOS},
}
HELD_OUT_SUBJECTS = ("digit 7", "texture brick")
#: every (fill, background) pair of distinct colours, in label order
PAIRS = tuple((fill, back) for fill in CIRCLE_COLOURS for back in CIRCLE_COLOURS if fill != back)
#: colour i on colours i+1 and i+3 (mod 8): each colour twice as a fill and twice as a background
HELD_OUT_PAIRS = tuple(
    (CIRCLE_COLOURS[i], CIRCLE_COLOURS[(i + k) % len(CIRCLE_COLOURS)])
    for i in range(len(CIRCLE_COLOURS))
    for k in (1, 3)
)
#: circles per colour pair and split
CIRCLES_PER_PAIR = {"train": 24, "val": 8, "test": 8}
SUBSETS = ("subjects", "circles")
SPLITS = ("train", "val", "test")


def pair_name(fill: str, background: str) -> str:
    return f"{fill} circle on a {background} background"


def class_names(subset: str) -> list[str]:
    """The CLIP class names of a subset, in label order."""
    if subset == "subjects":
        return list(SUBJECT_NAMES.values())
    return [pair_name(*pair) for pair in PAIRS]


def held_out_classes(subset: str) -> list[int]:
    """Labels of the subset's classes never seen in pretraining."""
    if subset == "subjects":
        return [list(SUBJECT_NAMES).index(s) for s in HELD_OUT_SUBJECTS]
    return [PAIRS.index(pair) for pair in HELD_OUT_PAIRS]


class NamedImages(Dataset):
    """uint8 images (N, S, S, 3), labels and CLIP class names; items are ``(PIL image, label)``."""

    def __init__(
        self, images: np.ndarray, labels: list[int], classes: list[str], transform: Callable | None = None
    ) -> None:
        self.images, self.targets, self.classes, self.transform = images, labels, classes, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


def subject_images(split: str, size: int = 32, seed: int = 0) -> NamedImages:
    """The 23 subjects' images of ``split`` (the captioned mix's, circles left out), labelled by class name."""
    mix = captioned_mix(split, size=size, seed=seed, exclude=("circle",), circles=0)
    order = list(SUBJECT_NAMES)
    labels = [order.index(SUBJECTS[label]) for label in mix.targets]
    return NamedImages(mix.images, labels, class_names("subjects"))


def circle_images(split: str, size: int = 32, seed: int = 0) -> NamedImages:
    """``CIRCLES_PER_PAIR[split]`` circles of every colour pair, centre and radius drawn per pair and split."""
    images, labels = [], []
    for label, (fill, back) in enumerate(PAIRS):
        rng = np.random.default_rng([seed, SPLITS.index(split), 4, label])
        for _ in range(CIRCLES_PER_PAIR[split]):
            radius = int(rng.integers(size // 6, size // 3))
            centre = tuple(int(rng.integers(radius, size - radius)) for _ in range(2))
            images.append(circle_image(fill, back, centre, radius, size))
            labels.append(label)
    return NamedImages(np.stack(images), labels, class_names("circles"))


def pretraining_images(size: int = 32, seed: int = 0, held_out: bool = True) -> NamedImages:
    """The train split of both subsets in one label space (subjects first, then colour pairs), without the held-out
    classes unless ``held_out=False``; ``classes`` are the class names of every label."""
    subjects, circles = subject_images("train", size, seed), circle_images("train", size, seed)
    offset = len(subjects.classes)
    skip = set(held_out_classes("subjects")) | {offset + c for c in held_out_classes("circles")} if held_out else set()
    labels = [*subjects.targets, *(offset + y for y in circles.targets)]
    keep = [i for i, y in enumerate(labels) if y not in skip]
    images = np.concatenate([subjects.images, circles.images])[keep]
    return NamedImages(images, [labels[i] for i in keep], [*subjects.classes, *circles.classes])


@DATASETS.register("clip_mix")
def clip_mix(
    split: str,
    root: str | None = None,
    transform: Callable | None = None,
    subset: str = "subjects",
    size: int = 32,
    seed: int = 0,
    **_,
) -> NamedImages:
    """A subset (``subjects``: 23 classes, ``circles``: 56 colour pairs) of the tiny CLIP's data, held-out classes
    included; splits ``train`` / ``val`` / ``test``."""
    if subset not in SUBSETS:
        raise DataError(f"clip_mix has the subsets {', '.join(SUBSETS)}, not '{subset}'")
    if split not in SPLITS:
        raise DataError(f"clip_mix has the splits {', '.join(SPLITS)}, not '{split}'")
    dataset = subject_images(split, size, seed) if subset == "subjects" else circle_images(split, size, seed)
    dataset.transform = transform
    return dataset
