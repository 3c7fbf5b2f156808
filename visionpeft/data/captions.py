"""Per-image captions for the few-image sets, and the caption augmentations of kohya's sd-scripts.

Where a caption comes from (:func:`read_captions`): a ``metadata.jsonl`` in the image folder (diffusers' imagefolder
layout: one JSON object a line with ``file_name`` and ``text``), else a ``.txt`` beside each image with the image's
stem (sd-scripts' ``caption_extension``; its first line, stripped: ``library/train_util.py`` ``read_caption``, line
1968 at 48d368f). An image with neither keeps the set's own prompt (the instance prompt). Everything is checked when
the set is built, one line naming the file: a folder with both layouts, a ``.txt`` with no image of its stem, an empty
or non-UTF-8 caption file, a metadata line that is not a JSON object with a string ``file_name`` and ``text``, names a
file that is not one of the folder's images, or names one twice.

What happens each time a caption is drawn (:class:`CaptionAugment`), as sd-scripts' ``BaseDataset.process_caption``
(``library/train_util.py`` lines 821-915 at 48d368f), without its wildcards, tag dropout and token warm-up:

- caption dropout: the whole caption becomes ``""`` with probability ``dropout`` (lines 829-837), decided first;
- tag shuffle: the caption is split at commas and each tag stripped (line 884); the first ``keep_tokens`` tags stay
  in place (lines 886-888), the others are shuffled (line 911), and the tags are joined with ``", "`` (line 915).

The draws come from torch's global generator (which a run seeds and its saved state restores, unlike sd-scripts'
``random``), and only when the knob is on: with both off a caption is returned untouched and nothing is drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError

METADATA = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"


def read_captions(folder: str | Path, images: list[Path]) -> dict[str, str]:
    """The caption of each image that has one, by file name (images without one are left out).

    Args:
        folder: The image folder.
        images: The folder's image files (what a caption may name).

    Raises:
        DataError: One line naming the file or line at fault (see the module docstring).
    """
    folder = Path(folder)
    texts = sorted(p for p in folder.iterdir() if p.suffix.lower() == CAPTION_SUFFIX and p.is_file())
    if (folder / METADATA).is_file():
        if texts:
            raise DataError(
                f"{folder} holds both {METADATA} and caption files ({texts[0].name}); keep one of the two layouts"
            )
        return _metadata_captions(folder / METADATA, {p.name for p in images})
    stems = {p.stem: p.name for p in images}
    captions = {}
    for text in texts:
        if text.stem not in stems:
            raise DataError(f"caption file {text} has no image named {text.stem}.* beside it")
        captions[stems[text.stem]] = _first_line(text)
    return captions


def _first_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"caption file {path} is not UTF-8 text") from None
    if not lines or not lines[0].strip():
        raise DataError(f"caption file {path} is empty (its first line is the caption)")
    return lines[0].strip()


def _metadata_captions(listing: Path, names: set[str]) -> dict[str, str]:
    captions: dict[str, str] = {}
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{listing} line {number}"
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{where} is not a JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{where} is {json.dumps(record)[:40]}, not a JSON object with file_name and text")
        missing = [key for key in ("file_name", "text") if not isinstance(record.get(key), str)]
        if missing:
            raise DataError(f"{where} has no {' and '.join(missing)} (strings)")
        name = record["file_name"]
        if name not in names:
            problem = "does not exist" if not (listing.parent / name).exists() else "is not one of its images"
            raise DataError(f"{where}: file_name {name} {problem} in {listing.parent}")
        if name in captions:
            raise DataError(f"{where}: {name} is listed twice")
        captions[name] = record["text"].strip()
    return captions


@dataclass(frozen=True)
class CaptionAugment:
    """What is done to a caption each time it is drawn (see the module docstring).

    Attributes:
        dropout: Probability of the empty caption (sd-scripts' ``caption_dropout_rate``).
        shuffle: Shuffle the comma-separated tags (sd-scripts' ``--shuffle_caption``).
        keep_tokens: Tags kept in place at the start when shuffling (sd-scripts' ``--keep_tokens``).
    """

    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0

    @property
    def active(self) -> bool:
        return self.dropout > 0 or self.shuffle

    def __call__(self, caption: str) -> str:
        if self.dropout > 0 and bool(torch.rand(()) < self.dropout):
            return ""
        if not self.shuffle:
            return caption
        tags = [tag.strip() for tag in caption.strip().split(",")]
        fixed, flexible = tags[: self.keep_tokens], tags[self.keep_tokens :]
        order = torch.randperm(len(flexible)).tolist()
        return ", ".join(fixed + [flexible[i] for i in order])
