"""The 11 few-shot data sets of CoOp / CoCoOp in the official layout (KaiyangZhou/CoOp ``DATASETS.md``).

Each lives in its own folder under ``data.root`` (CoOp's ``$DATA``), read as the official ``datasets/*.py`` readers
read it when their split files exist (``datasets/coop.md`` has the layout, the downloads and the commands):

* nine data sets have CoOp's fixed split ``split_zhou_<Name>.json``: ``{"train" | "val" | "test": [[relative image
  path, label, class name], ...]}``, the paths relative to the image folder (StanfordCars: to its own folder);
* FGVCAircraft reads ``variants.txt`` (the 100 class names, one a line, in label order) and
  ``images_variant_{train,val,test}.txt`` (``<image id> <variant>`` per line, the image ``images/<id>.jpg``);
* ImageNet reads ``classnames.txt`` (``<wnid> <class name>`` per line) and the class folders of ``images/train``
  and ``images/val``, labels in the sorted order of the folder names; ``val`` is also the ``test`` split, as CoOp
  tests on the validation set.

Splits are ``train``, ``val`` and ``test``. Class names are those of the official readers with CoOp's prompt
learner's ``name.replace("_", " ")`` applied (``trainers/coop.py`` line 98), e.g. OxfordPets' ``american_bulldog``
is ``american bulldog``. Images are opened only when an item is read (``skip_bad_images=true`` checks them all when
the data set is built). Few-shot subsets and the base / new class halves are ``data.shots`` / ``data.class_split``
(:mod:`visionpeft.data.fewshot`: CoCoOp's first ``ceil(n / 2)`` classes are the base ones).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..registry import DATASETS
from .images import load_rgb, screen_images

SPLITS = ("train", "val", "test")
DOC = "datasets/coop.md and CoOp's DATASETS.md"


@dataclass(frozen=True)
class CoOpSet:
    """Where one data set lives: its folder under ``data.root``, its split file and its image folder."""

    title: str  #: CoOp's class name (``CUSTOM_TEMPLATES`` key)
    folder: str  #: ``dataset_dir``
    split_file: str | None  #: ``split_zhou_*.json`` (None: FGVCAircraft / ImageNet read their own files)
    image_dir: str  #: what the split's paths are relative to ("" = the folder itself)
    classes: int
    template: str  #: the hand-crafted prompt of ``trainers/zsclip.py`` ``CUSTOM_TEMPLATES``


#: registered name (``coop-<CoOp's configs/datasets file>``) -> layout, in DATASETS.md's order
COOP_DATASETS: dict[str, CoOpSet] = {
    "coop-imagenet": CoOpSet("ImageNet", "imagenet", None, "images", 1000, "a photo of a {}."),
    "coop-caltech101": CoOpSet(
        "Caltech101", "caltech-101", "split_zhou_Caltech101.json", "101_ObjectCategories", 100, "a photo of a {}."
    ),
    "coop-oxford_pets": CoOpSet(
        "OxfordPets", "oxford_pets", "split_zhou_OxfordPets.json", "images", 37, "a photo of a {}, a type of pet."
    ),
    "coop-stanford_cars": CoOpSet(
        "StanfordCars", "stanford_cars", "split_zhou_StanfordCars.json", "", 196, "a photo of a {}."
    ),
    "coop-oxford_flowers": CoOpSet(
        "OxfordFlowers",
        "oxford_flowers",
        "split_zhou_OxfordFlowers.json",
        "jpg",
        102,
        "a photo of a {}, a type of flower.",
    ),
    "coop-food101": CoOpSet(
        "Food101", "food-101", "split_zhou_Food101.json", "images", 101, "a photo of {}, a type of food."
    ),
    "coop-fgvc_aircraft": CoOpSet(
        "FGVCAircraft", "fgvc_aircraft", None, "images", 100, "a photo of a {}, a type of aircraft."
    ),
    "coop-sun397": CoOpSet("SUN397", "sun397", "split_zhou_SUN397.json", "SUN397", 397, "a photo of a {}."),
    "coop-dtd": CoOpSet(
        "DescribableTextures", "dtd", "split_zhou_DescribableTextures.json", "images", 47, "{} texture."
    ),
    "coop-eurosat": CoOpSet(
        "EuroSAT", "eurosat", "split_zhou_EuroSAT.json", "2750", 10, "a centered satellite photo of {}."
    ),
    "coop-ucf101": CoOpSet(
        "UCF101", "ucf101", "split_zhou_UCF101.json", "UCF-101-midframes", 101, "a photo of a person doing {}."
    ),
}


def _missing(what: Path, name: str) -> ConfigError:
    return ConfigError(f"{name}: {what} does not exist; see {DOC} to prepare it under data.root")


def _json_split(folder: Path, info: CoOpSet, split: str, name: str) -> tuple[list, dict[int, str]]:
    """(items, label -> class name) of a ``split_zhou_*.json`` (``OxfordPets.read_split``)."""
    path = folder / info.split_file
    if not path.is_file():
        raise _missing(path, name)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a CoOp split file: {err}") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(s), list) for s in SPLITS):
        raise DataError(f"{path} must map train / val / test to lists of [image path, label, class name]")
    names: dict[int, str] = {}
    for part in ("train", "val", "test"):  # Dassl's lab2cname: the training items' names first
        for number, entry in enumerate(data[part]):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], int)):
                raise DataError(f"{path}: {part}[{number}] is not [image path, label, class name]: {entry!r:.80}")
            names.setdefault(entry[1], str(entry[2]))
    prefix = folder / info.image_dir if info.image_dir else folder
    return [(prefix / entry[0], entry[1]) for entry in data[split]], names


def _fgvc_split(folder: Path, split: str, name: str) -> tuple[list, dict[int, str]]:
    """``FGVCAircraft.read_data``: ``variants.txt`` gives the labels, ``images_variant_<split>.txt`` the items."""
    variants_file = folder / "variants.txt"
    if not variants_file.is_file():
        raise _missing(variants_file, name)
    variants = [line.strip() for line in variants_file.read_text().splitlines() if line.strip()]
    label_of = {variant: label for label, variant in enumerate(variants)}
    listing = folder / f"images_variant_{split}.txt"
    if not listing.is_file():
        raise _missing(listing, name)
    items = []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.strip().split(" ")
        if not parts[0]:
            continue
        variant = " ".join(parts[1:])
        if variant not in label_of:
            raise DataError(f"{listing}:{number}: variant {variant!r} is not in {variants_file}")
        items.append((folder / "images" / f"{parts[0]}.jpg", label_of[variant]))
    return items, dict(enumerate(variants))


def _imagenet_split(folder: Path, split: str, name: str) -> tuple[list, dict[int, str]]:
    """``ImageNet.read_data``: the sorted class folders of ``images/<train|val>``, named by ``classnames.txt``."""
    names_file = folder / "classnames.txt"
    if not names_file.is_file():
        raise _missing(names_file, name)
    named = {}
    for line in names_file.read_text().splitlines():
        parts = line.strip().split(" ")
        if parts[0]:
            named[parts[0]] = " ".join(parts[1:])
    images = folder / "images" / ("train" if split == "train" else "val")  # val is CoOp's test set too
    if not images.is_dir():
        raise _missing(images, name)
    wnids = sorted(entry.name for entry in images.iterdir() if entry.is_dir())
    unnamed = [wnid for wnid in wnids if wnid not in named]
    if unnamed:
        raise DataError(f"{images}/{unnamed[0]} has no line in {names_file}")
    items = []
    for label, wnid in enumerate(wnids):
        files = sorted(f for f in (images / wnid).iterdir() if not f.name.startswith("."))
        items += [(path, label) for path in files]
    return items, {label: named[wnid] for label, wnid in enumerate(wnids)}


class CoOpDataset(Dataset):
    """One split of one of CoOp's 11 data sets (``name`` a key of :data:`COOP_DATASETS`)."""

    def __init__(self, name: str, split: str, root: str, transform=None, skip_bad_images: bool = False) -> None:
        if split not in SPLITS:
            raise DataError(f"{name} splits are {', '.join(SPLITS)}, not '{split}'")
        info = COOP_DATASETS[name]
        self.folder = Path(root).expanduser() / info.folder
        if not self.folder.is_dir():
            raise _missing(self.folder, name)
        if info.title == "ImageNet":
            items, names = _imagenet_split(self.folder, split, name)
        elif info.title == "FGVCAircraft":
            items, names = _fgvc_split(self.folder, split, name)
        else:
            items, names = _json_split(self.folder, info, split, name)
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{name} under {self.folder}: the labels are not 0..{len(names) - 1}")
        self.classes = [names[label].replace("_", " ") for label in range(len(names))]
        self.template = info.template
        if skip_bad_images:
            keep = screen_images([path for path, _ in items], str(self.folder), True)
            items = [items[i] for i in keep]
        self.samples: list[tuple[Path, int]] = items
        self.targets = [label for _, label in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), label


def _builder(name: str):
    def build(split: str, root: str | None = None, transform=None, skip_bad_images: bool = False, **_):
        if root is None:
            raise ConfigError(f"{name} needs data.root (the folder holding {COOP_DATASETS[name].folder}/); see {DOC}")
        return CoOpDataset(name, split, root, transform, bool(skip_bad_images))

    info = COOP_DATASETS[name]
    build.__doc__ = f"CoOp's {info.title} ({info.classes} classes) from data.root/{info.folder}/."
    return build


for _name in COOP_DATASETS:
    DATASETS.register(_name)(_builder(_name))
