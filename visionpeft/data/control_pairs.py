"""(image, condition image, caption) triples for training controls, in the layouts people have.

``root/metadata.jsonl`` with diffusers' columns (``image``, ``conditioning_image``, ``text``; paths relative to the
root), or the original fill50k layout (``root/prompt.json``: one JSON object a line with ``source``, ``target``,
``prompt``). Several controls trained at once each read a condition column of their own (``columns``: ``[edges,
depth]`` for lines with ``"edges": "edges/0.png", "depth": "depth/0.png"``), in the order of the methods.

Every line and file is checked when the set is built, so a mistake is one line naming it before training starts: a
line that is not a JSON object, a path leaving the data folder (absolute, or up through ``..``), a missing file, and
a condition image of another size than its target. Such a pair is refused rather than resized:
the transforms resize the short side and centre-crop each image on its own, so a condition of another size or
shape would no longer line up with its target, and no resize can know how the two were meant to align.
Transforms follow diffusers' ``train_controlnet.py``: resize the short side and centre-crop to ``size``; the target
in [-1, 1], the condition in [0, 1]. Images are read with :func:`.images.load_rgb` (16-bit and float images too).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from ..errors import DataError
from ..io import kind_problem
from .conditions import make_condition
from .images import header_size, load_rgb

LAYOUTS = {"metadata.jsonl": ("image", "conditioning_image", "text"), "prompt.json": ("target", "source", "prompt")}


def read_pairs(root: str | Path, computed: bool = False, columns: Sequence[str] | None = None) -> list[dict]:
    """The records of a control data folder (keys ``image``, ``conditioning_image``, ``text`` + any extra ones; with
    their condition images read from the data, ``conditions``: the paths of ``columns``, the layout's condition
    column by default; ``conditioning_image`` is the first of them).

    With ``computed`` (the condition is made from the image) the condition column may be absent, and a folder of
    images with a same-named ``.txt`` caption each is a data set too.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"control data folder {root} {kind_problem(root, 'folder')}")
    name = next((n for n in LAYOUTS if (root / n).is_file()), None)
    if name is None and computed:
        return _captioned_images(root)
    if name is None:
        raise DataError(f"{root} holds neither metadata.jsonl (image, conditioning_image, text) nor prompt.json")
    image, condition, text = LAYOUTS[name]
    conditions = tuple(columns or (condition,))
    required = (image, text) if computed else (image, *conditions, text)
    records = []
    for number, line in enumerate((root / name).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{root / name} line {number}"
        try:
            raw = json.loads(line)
        except ValueError:
            raise DataError(f"{where} is not a JSON object") from None
        if not isinstance(raw, dict):
            raise DataError(f"{where} is {json.dumps(raw)[:40]}, not a JSON object with {', '.join(required)}")
        missing = [key for key in required if not isinstance(raw.get(key), str)]
        if missing:
            raise DataError(f"{where} has no {', '.join(missing)}")
        record = {**raw, "image": raw[image], "conditioning_image": raw.get(conditions[0]), "text": raw[text]}
        if not computed:
            record["conditions"] = [raw[column] for column in conditions]
        for path in (record["image"], *record.get("conditions", [])):
            _check_inside(root, path, where)
        records.append(record)
    if not records:
        raise DataError(f"{root / name} lists no pairs")
    if not computed:
        _check_sizes(root, records, root / name)
    return records


def _check_inside(root: Path, relative: str, where: str) -> None:
    """A listed file lies inside the data folder (no absolute path, no way up through ``..``) and exists."""
    normal = os.path.normpath(relative)
    if Path(relative).is_absolute() or normal == ".." or normal.startswith(f"..{os.sep}"):
        raise DataError(f"{where}: {relative} leaves the data folder {root}; list paths relative to it, inside it")
    if not (root / relative).is_file():
        raise DataError(f"{where}: {root / relative} does not exist")


def _check_sizes(root: Path, records: list[dict], listing: Path) -> None:
    """Every condition image has its target's size (headers only; see the module docstring for why)."""
    files = [(root / r["image"], root / path) for r in records for path in r["conditions"]]
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        sizes = list(pool.map(lambda pair: (header_size(pair[0]), header_size(pair[1])), files))
    for (target, condition), (target_size, condition_size) in zip(files, sizes):
        if target_size != condition_size:
            raise DataError(
                f"condition image {condition} is {condition_size[0]}x{condition_size[1]} pixels but its target "
                f"{target} is {target_size[0]}x{target_size[1]} (listed in {listing}); a pair must have one size, "
                "since each image is resized and centre-cropped on its own"
            )


def _captioned_images(root: Path) -> list[dict]:
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not images:
        raise DataError(f"{root} holds no metadata.jsonl, prompt.json or images with .txt captions")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise DataError(f"{missing[0]} has no caption file {missing[0].with_suffix('.txt').name}")
    return [
        {"image": p.name, "conditioning_image": None, "text": p.with_suffix(".txt").read_text().strip()} for p in images
    ]


def condition_transform(size: int) -> T.Compose:
    """A condition image's transform: resize the short side to ``size``, centre-crop, float in [0, 1]."""
    resize = [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(size)]
    return T.Compose([T.ToImage(), *resize, T.ToDtype(torch.float32, scale=True)])


class ControlPairs(Dataset):
    """Training items ``{"pixel_values", "conditioning_pixel_values", "prompt"}``.

    Args:
        root: The data folder. size: Training resolution.
        proportion_empty_prompts: Share of captions replaced by "" (diffusers' option; the control alone must
            carry the image then).
        condition: ``none`` (the pairs' condition images) or a condition computed from each image (``canny``,
            ``grayscale``, ``blur``: :mod:`.conditions`), with random settings unless ``train`` is False.
        columns: The condition columns, one per control (see :func:`read_pairs`); with several, an item's
            ``conditioning_pixel_values`` is the list of their images, in that order.
    """

    def __init__(
        self,
        root: str | Path,
        size: int,
        proportion_empty_prompts: float = 0.0,
        condition: str = "none",
        train: bool = True,
        columns: Sequence[str] | None = None,
    ) -> None:
        self.root, self.records = Path(root), read_pairs(root, condition != "none", columns)
        self.proportion_empty_prompts, self.condition_kind, self.train = proportion_empty_prompts, condition, train
        self.condition = condition_transform(size)  # [0, 1]
        self.image = T.Compose([self.condition, T.Normalize([0.5] * 3, [0.5] * 3)])  # [-1, 1]

    def for_validation(self) -> ControlPairs:
        """The same pairs with fixed conditions and every caption kept (the records are shared, not read again)."""
        shown = copy.copy(self)
        shown.train, shown.proportion_empty_prompts = False, 0.0
        return shown

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        empty = self.proportion_empty_prompts and torch.rand(()) < self.proportion_empty_prompts
        image = load_rgb(self.root / record["image"])
        if self.condition_kind == "none":
            conditions = [self.condition(load_rgb(self.root / path)) for path in record["conditions"]]
        else:
            conditions = [self.condition(make_condition(image, self.condition_kind, self.train))]
        return {
            "pixel_values": self.image(image),
            "conditioning_pixel_values": conditions[0] if len(conditions) == 1 else conditions,
            "prompt": "" if empty else record["text"],
        }
