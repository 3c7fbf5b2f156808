"""Whole-image and sliding-window inference, with mmsegmentation's semantics.

Sliding window (mmseg's ``slide_inference``): a grid of ``crop``-sized windows every ``stride`` pixels, the last
row / column clamped to the image border, each window's logits added where it lies and the sum divided by how many
windows covered each pixel. Images smaller than the crop are padded (bottom / right, with zeros after
normalisation, as mmseg's data preprocessor pads) so every window is exactly ``crop``, and the padding is cut off
the logits. mmseg's code is not a dependency (its last release predates current torch); this follows it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .seg_heads import resize_to

MODES = ("whole", "slide")


def window_grid(height: int, width: int, crop: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` of mmseg's sliding windows over a ``height`` x ``width`` image."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


@torch.no_grad()
def slide_logits(
    model: nn.Module, images: torch.Tensor, crop: Sequence[int], stride: Sequence[int], max_batch: int = 8
) -> torch.Tensor:
    """Sliding-window logits ``(batch, classes, height, width)`` of ``model`` (images -> logits at their size).

    Args:
        crop: Window (height, width). stride: Step (height, width). max_batch: Windows per forward pass.
    """
    height, width = images.shape[-2:]
    padded_h, padded_w = max(height, crop[0]), max(width, crop[1])
    if (padded_h, padded_w) != (height, width):
        images = F.pad(images, (0, padded_w - width, 0, padded_h - height))
    windows = window_grid(padded_h, padded_w, crop, stride)
    crops = [(b, w) for w in windows for b in range(images.shape[0])]
    total: torch.Tensor | None = None
    count = images.new_zeros(1, 1, padded_h, padded_w)
    for start in range(0, len(crops), max_batch):
        chunk = crops[start : start + max_batch]
        batch = torch.stack([images[b, :, y1:y2, x1:x2] for b, (y1, y2, x1, x2) in chunk])
        logits = model(batch).float()
        if total is None:
            total = logits.new_zeros(images.shape[0], logits.shape[1], padded_h, padded_w)
        for out, (b, (y1, y2, x1, x2)) in zip(logits, chunk):
            total[b, :, y1:y2, x1:x2] += out
    for y1, y2, x1, x2 in windows:
        count[..., y1:y2, x1:x2] += 1
    return (total / count)[..., :height, :width]


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    mode: str = "whole",
    crop: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Logits of a batch of same-size images, whole or sliding-window, resized to ``size`` (the label map's size,
    which may differ from the resized input's, as in mmseg) when given."""
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {MODES}, got {mode!r}")
    logits = model(images).float() if mode == "whole" else slide_logits(model, images, crop, stride)
    return resize_to(logits, size) if size is not None else logits


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    sizes: Sequence[Sequence[int]],
    mode: str = "whole",
    crop: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
) -> list[torch.Tensor]:
    """Label maps ``(height, width)`` (long) for images of any sizes, each at its own ``sizes[i]`` (one forward pass
    when all images and sizes agree)."""
    if len({tuple(i.shape) for i in images}) == 1 and len({tuple(s) for s in sizes}) == 1:
        return list(predict_logits(model, torch.stack(list(images)), mode, crop, stride, sizes[0]).argmax(1))
    return [
        predict_logits(model, image[None], mode, crop, stride, size)[0].argmax(0) for image, size in zip(images, sizes)
    ]
