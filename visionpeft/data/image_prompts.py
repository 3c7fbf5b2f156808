"""(image, caption) pairs for training an IP-Adapter: each image is also its own image prompt.

Items follow tencent-ailab/IP-Adapter ``tutorial_train.py`` (``MyDataset``, lines 28-102): the image resized on its
short side and centre-cropped to ``size`` in [-1, 1] for the VAE, the same image through the CLIP image processor for
the frozen image encoder, and one draw per item that drops the image prompt (``i_drop_rate``), else the caption
(``t_drop_rate``), else both (``ti_drop_rate``), 0.05 each there (lines 62-70). Sources: a folder
(``metadata.jsonl`` with ``image`` / ``text`` columns, or images with same-named ``.txt`` captions; read as the
control task reads them) or the embedded captioned mix (:mod:`visionpeft.demo.captioned_mix`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .control_pairs import condition_transform, read_pairs
from .images import load_rgb


@dataclass(frozen=True)
class PromptDrops:
    """Shares of items whose image prompt, caption, or both are dropped (one draw decides, in that order)."""

    image: float = 0.05
    text: float = 0.05
    both: float = 0.05

    def draw(self, generator: torch.Generator | None = None) -> tuple[bool, bool]:
        """(drop the image prompt, drop the caption) for one item (``tutorial_train.py`` lines 62-70)."""
        value = float(torch.rand((), generator=generator))
        if value < self.image:
            return True, False
        if value < self.image + self.text:
            return False, True
        if value < self.image + self.text + self.both:
            return True, True
        return False, False


class ImagePrompts(Dataset):
    """Training items ``{"pixel_values", "clip_pixel_values", "prompt", "drop_image"}``.

    Args:
        images: ``images[i]()`` reads image ``i`` (an RGB PIL image). captions: One per image.
        size: Training resolution. processor: The image encoder's processor (a ``CLIPImageProcessor``).
        drops: What to drop, and how often (none: ``PromptDrops(0, 0, 0)``).
    """

    def __init__(
        self,
        images: list[Callable[[], Image.Image]],
        captions: list[str],
        size: int,
        processor,
        drops: PromptDrops | None = None,
    ) -> None:
        self.images, self.captions, self.processor = images, captions, processor
        self.drops = drops if drops is not None else PromptDrops()
        self.image = condition_transform(size)

    def __len__(self) -> int:
        return len(self.captions)

    def reference(self, index: int) -> Image.Image:
        return self.images[index]()

    def __getitem__(self, index: int) -> dict:
        image = self.reference(index)
        drop_image, drop_text = self.drops.draw()
        return {
            "pixel_values": self.image(image) * 2 - 1,
            "clip_pixel_values": self.processor(images=image, return_tensors="pt").pixel_values[0],
            "prompt": "" if drop_text else self.captions[index],
            "drop_image": drop_image,
        }


def folder_image_prompts(root: str | Path, size: int, processor, drops: PromptDrops | None = None) -> ImagePrompts:
    """The captioned images of a folder (every listed file checked up front: one line naming a problem)."""
    root = Path(root)
    records = read_pairs(root, computed=True)
    return ImagePrompts(
        [functools.partial(load_rgb, root / r["image"]) for r in records],
        [r["text"] for r in records],
        size,
        processor,
        drops,
    )


def captioned_mix_image_prompts(
    split: str, size: int, processor, drops: PromptDrops | None = None, held_out: bool = False, seed: int = 0
) -> ImagePrompts:
    """The embedded captioned mix (32 px); its held-out subjects (digit 7, brick) only with ``held_out``."""
    from ..demo.captioned_mix import HELD_OUT, captioned_mix

    mix = captioned_mix(split, seed=seed, exclude=() if held_out else HELD_OUT)
    images = [functools.partial(Image.fromarray, array) for array in mix.images]
    return ImagePrompts(images, list(mix.captions), size, processor, drops)
