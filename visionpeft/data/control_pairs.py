"""(image, condition image, caption) triples for training controls, in the layouts people have.

``root/metadata.jsonl`` with diffusers' columns (``image``, ``conditioning_image``, ``text``; paths relative to the
root), or the original fill50k layout (``root/prompt.json``: one JSON object a line with ``source``, ``target``,
``prompt``). Every line and file is checked when the set is built, so a mistake is one line naming it before
training starts. Transforms follow diffusers' ``train_controlnet.py``: resize the short side and centre-crop to
``size``; the target in [-1, 1], the condition in [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from ..errors import DataError
from .images import load_rgb

LAYOUTS = {"metadata.jsonl": ("image", "conditioning_image", "text"), "prompt.json": ("target", "source", "prompt")}


def read_pairs(root: str | Path) -> list[dict]:
    """The records of a control data folder (keys ``image``, ``conditioning_image``, ``text`` + any extra ones)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"control data folder {root} does not exist")
    name = next((n for n in LAYOUTS if (root / n).is_file()), None)
    if name is None:
        raise DataError(f"{root} holds neither metadata.jsonl (image, conditioning_image, text) nor prompt.json")
    image, condition, text = LAYOUTS[name]
    records = []
    for number, line in enumerate((root / name).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError:
            raise DataError(f"{root / name} line {number} is not a JSON object") from None
        missing = [key for key in (image, condition, text) if not isinstance(raw.get(key), str)]
        if missing:
            raise DataError(f"{root / name} line {number} has no {', '.join(missing)}")
        record = {**raw, "image": raw[image], "conditioning_image": raw[condition], "text": raw[text]}
        for key in ("image", "conditioning_image"):
            if not (root / record[key]).is_file():
                raise DataError(f"{root / name} line {number}: {root / record[key]} does not exist")
        records.append(record)
    if not records:
        raise DataError(f"{root / name} lists no pairs")
    return records


class ControlPairs(Dataset):
    """Training items ``{"pixel_values", "conditioning_pixel_values", "prompt"}``.

    Args:
        root: The data folder. size: Training resolution.
        proportion_empty_prompts: Share of captions replaced by "" (diffusers' option; the control alone must
            carry the image then).
    """

    def __init__(self, root: str | Path, size: int, proportion_empty_prompts: float = 0.0) -> None:
        self.root, self.records = Path(root), read_pairs(root)
        self.proportion_empty_prompts = proportion_empty_prompts
        resize = [T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(size)]
        self.condition = T.Compose([T.ToImage(), *resize, T.ToDtype(torch.float32, scale=True)])  # [0, 1]
        self.image = T.Compose([self.condition, T.Normalize([0.5] * 3, [0.5] * 3)])  # [-1, 1]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        empty = self.proportion_empty_prompts and torch.rand(()) < self.proportion_empty_prompts
        return {
            "pixel_values": self.image(load_rgb(self.root / record["image"])),
            "conditioning_pixel_values": self.condition(load_rgb(self.root / record["conditioning_image"])),
            "prompt": "" if empty else record["text"],
        }
