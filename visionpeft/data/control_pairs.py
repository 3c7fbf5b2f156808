"""(image, condition image, caption) triples for training controls, in the layouts people have.

``root/metadata.jsonl`` with diffusers' columns (``image``, ``conditioning_image``, ``text``; paths relative to the
root), or the original fill50k layout (``root/prompt.json``: one JSON object a line with ``source``, ``target``,
``prompt``). Every line and file is checked when the set is built, so a mistake is one line naming it before
training starts. Transforms follow diffusers' ``train_controlnet.py``: resize the short side and centre-crop to
``size``; the target in [-1, 1], the condition in [0, 1].
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from ..errors import DataError
from .conditions import make_condition
from .images import load_rgb

LAYOUTS = {"metadata.jsonl": ("image", "conditioning_image", "text"), "prompt.json": ("target", "source", "prompt")}


def read_pairs(root: str | Path, computed: bool = False) -> list[dict]:
    """The records of a control data folder (keys ``image``, ``conditioning_image``, ``text`` + any extra ones).

    With ``computed`` (the condition is made from the image) the condition column may be absent, and a folder of
    images with a same-named ``.txt`` caption each is a data set too.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"control data folder {root} does not exist")
    name = next((n for n in LAYOUTS if (root / n).is_file()), None)
    if name is None and computed:
        return _captioned_images(root)
    if name is None:
        raise DataError(f"{root} holds neither metadata.jsonl (image, conditioning_image, text) nor prompt.json")
    image, condition, text = LAYOUTS[name]
    required = (image, text) if computed else (image, condition, text)
    records = []
    for number, line in enumerate((root / name).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError:
            raise DataError(f"{root / name} line {number} is not a JSON object") from None
        missing = [key for key in required if not isinstance(raw.get(key), str)]
        if missing:
            raise DataError(f"{root / name} line {number} has no {', '.join(missing)}")
        record = {**raw, "image": raw[image], "conditioning_image": raw.get(condition), "text": raw[text]}
        for key in ("image", "conditioning_image"):
            if record[key] is not None and not (root / record[key]).is_file():
                raise DataError(f"{root / name} line {number}: {root / record[key]} does not exist")
        records.append(record)
    if not records:
        raise DataError(f"{root / name} lists no pairs")
    return records


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


class ControlPairs(Dataset):
    """Training items ``{"pixel_values", "conditioning_pixel_values", "prompt"}``.

    Args:
        root: The data folder. size: Training resolution.
        proportion_empty_prompts: Share of captions replaced by "" (diffusers' option; the control alone must
            carry the image then).
        condition: ``none`` (the pairs' condition images) or a condition computed from each image (``canny``,
            ``grayscale``, ``blur``: :mod:`.conditions`), with random settings unless ``train`` is False.
    """

    def __init__(
        self,
        root: str | Path,
        size: int,
        proportion_empty_prompts: float = 0.0,
        condition: str = "none",
        train: bool = True,
    ) -> None:
        self.root, self.records = Path(root), read_pairs(root, computed=condition != "none")
        self.proportion_empty_prompts, self.condition_kind, self.train = proportion_empty_prompts, condition, train
        resize = [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(size)]
        self.condition = T.Compose([T.ToImage(), *resize, T.ToDtype(torch.float32, scale=True)])  # [0, 1]
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
            condition = load_rgb(self.root / record["conditioning_image"])
        else:
            condition = make_condition(image, self.condition_kind, self.train)
        return {
            "pixel_values": self.image(image),
            "conditioning_pixel_values": self.condition(condition),
            "prompt": "" if empty else record["text"],
        }
