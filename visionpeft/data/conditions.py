"""Condition images computed from the target image, for image + caption sets without condition images.

``canny`` (scikit-image's detector; OpenCV's ``cv2.Canny`` where it is installed, the detector the released canny
ControlNets were trained with), ``grayscale`` (colourisation) and ``blur`` (a tile / upscaling control). In training
the canny thresholds are drawn around the tutorial's 100 / 200 (low from 50-150, high from low+50-low+150, on a 0-255
gradient scale), as the v1.0 canny model was trained with random thresholds; evaluation uses 100 / 200.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

CONDITIONS = ("canny", "grayscale", "blur")


def canny_edges(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """White edges on black, 3 channels, thresholds on a 0-255 gradient scale."""
    gray = np.asarray(image.convert("L"))
    try:
        import cv2

        edges = cv2.Canny(gray, low, high) > 0
    except ImportError:
        from skimage.feature import canny

        edges = canny(gray.astype(np.float64), sigma=1.0, low_threshold=low, high_threshold=high)
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def make_condition(image: Image.Image, kind: str, train: bool) -> Image.Image:
    """The condition image of ``kind`` for ``image``; random settings (torch's RNG) when ``train``."""
    if kind == "canny":
        low = float(torch.randint(50, 151, ())) if train else 100.0
        high = low + float(torch.randint(50, 151, ())) if train else 200.0
        return canny_edges(image, low, high)
    if kind == "grayscale":
        return image.convert("L").convert("RGB")
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(image.size) / 64)))
    raise ValueError(f"unknown condition {kind!r}; choose from {', '.join(CONDITIONS)}")
