"""``vp.segmentation``: semantic segmentation on plain ViTs.

>>> import visionpeft as vp
>>> seg = vp.segmentation.build(model, head="upernet", num_classes=150)   # timm ViT or open_clip CLIP
>>> vp.attach(seg, "lora", r=8)
>>> logits = seg(images)                                                  # (batch, 150, height, width)
>>> logits = vp.segmentation.predict_logits(seg, images, mode="slide", crop=(512, 512), stride=(341, 341))
"""

from __future__ import annotations

from .tasks.seg_heads import AUX_WEIGHT, HEADS, default_indices
from .tasks.seg_inference import MODES, predict_labels, predict_logits, slide_logits, window_grid
from .tasks.segmenter import Segmenter, build

__all__ = [
    "AUX_WEIGHT",
    "HEADS",
    "MODES",
    "Segmenter",
    "build",
    "default_indices",
    "predict_labels",
    "predict_logits",
    "slide_logits",
    "window_grid",
]
