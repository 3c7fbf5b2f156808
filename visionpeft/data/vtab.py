"""VTAB-1k in the layout the VPT and NOAH repositories use.

``root/<task>/`` holds the images and four list files, one ``<relative image path> <label>`` per line:
``train800.txt`` and ``val200.txt`` (for tuning), ``train800val200.txt`` (the final 1,000-image training set) and
``test.txt``. See ``datasets/vtab.md`` for how to prepare them.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from ..registry import DATASETS
from .images import load_rgb, screen_images

# task -> number of classes (NOAH's get_classes_num); groups as in the VTAB paper
VTAB_TASKS: dict[str, int] = {
    # natural
    "cifar": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    # specialized
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    # structured
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
SPLITS = ("train800", "val200", "train800val200", "test")


class VTAB1k(Dataset):
    """One VTAB-1k task read from its list files. The listed images are checked when it is built: a missing or
    unreadable one is a :class:`DataError`, or, with ``skip_bad_images``, left out."""

    def __init__(self, task: str, split: str, root: str, transform=None, skip_bad_images: bool = False) -> None:
        if split not in SPLITS:
            raise DataError(f"VTAB-1k splits are {', '.join(SPLITS)}, not '{split}'")
        self.folder = Path(root).expanduser() / task
        listing = self.folder / f"{split}.txt"
        if not listing.is_file():
            raise DataError(f"VTAB-1k list {listing} does not exist; see datasets/vtab.md to prepare {task}")
        self.samples: list[tuple[str, int]] = []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{listing}:{number} is not '<image path> <label>': {line!r}")
            self.samples.append((parts[0], int(parts[1])))
        self.classes = [str(i) for i in range(VTAB_TASKS[task])]
        bad = [y for _, y in self.samples if not 0 <= y < len(self.classes)]
        if bad:
            raise DataError(f"{listing} has label {bad[0]} outside 0..{len(self.classes) - 1}")
        keep = screen_images([self.folder / path for path, _ in self.samples], str(listing), skip_bad_images)
        self.samples = [self.samples[i] for i in keep]
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(self.folder / path)
        return (self.transform(image) if self.transform else image), label


def _builder(task: str):
    def build(split: str, root: str | None = None, transform=None, skip_bad_images: bool = False, **_):
        if root is None:
            raise DataError(f"vtab-{task} needs data.root (the folder holding {task}/)")
        return VTAB1k(task, split, root, transform, bool(skip_bad_images))

    build.__doc__ = f"VTAB-1k {task} ({VTAB_TASKS[task]} classes)."
    return build


for _task in VTAB_TASKS:
    DATASETS.register(f"vtab-{_task}")(_builder(_task))
