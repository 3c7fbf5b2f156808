"""A semantic segmenter: a plain ViT (timm, or the vision tower of an open_clip CLIP) plus a decode head.

The segmenter is a task model (:class:`~visionpeft.backbones.base.TaskModel`): ``vp.attach(seg, "lora", r=8)``
adapts its library model exactly as on a classifier, the decode head (and the auxiliary heads, if any) train with
every method, count as their own groups in ``vp.count_parameters(seg)["by_group"]`` and are saved with the adapter,
BatchNorm statistics included. Features come from the backbone contract (``vp.features``: class / register / prompt
tokens removed, on the actual input's patch grid), so non-square crops and timm's ``dynamic_img_size`` work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import backbone_of, features, methods_of
from ..errors import ConfigError, IncompatibleMethodError
from .seg_heads import HEADS, build_aux_heads, build_head, default_indices, inputs_needed, resize_to


class Segmenter(nn.Module):
    """Backbone + decode head; ``seg(images)`` returns logits ``(batch, classes, height, width)`` at the input's
    resolution (bilinear, ``align_corners=False``). Build one with :func:`build`.

    Args:
        model: The library model (timm ViT, open_clip CLIP).
        head: The decode head, reading the maps of ``indices``.
        indices: Blocks (0-based) the head reads, in its order.
        aux_heads: Auxiliary heads, one per block of ``aux_indices`` (their losses help training; not used at
            inference).
        tower: The backbone tower the features come from (the vision tower by default).
        metadata: What a saved adapter records about the task (head, classes, palette), see :meth:`task_metadata`.
        pad_to: Pad images (bottom / right, zeros) to a multiple of this (height, width) before the backbone and cut
            the logits back (mmseg's ``size_divisor``): the patch size of a backbone that does not pad itself, so
            whole images of any size can be segmented.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        indices: Sequence[int],
        aux_heads: nn.ModuleList | None = None,
        aux_indices: Sequence[int] = (),
        tower: str | None = None,
        metadata: dict[str, Any] | None = None,
        pad_to: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.pad_to = pad_to
        self.model = model
        self.head = head
        self.aux_head = aux_heads if aux_heads is not None and len(aux_heads) else None
        self.indices = list(indices)
        self.aux_indices = list(aux_indices) if self.aux_head is not None else []
        self.tower = tower
        self.metadata = dict(metadata or {})

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    def inner_model(self) -> nn.Module:
        """The task-model protocol: the library model methods adapt."""
        return self.model

    def task_heads(self) -> dict[str, nn.Module | None]:
        """The task-model protocol: the decode head and the auxiliary heads (trained, counted and saved)."""
        return {"head": self.head, "aux_head": self.aux_head}

    def task_metadata(self) -> dict[str, Any]:
        """Recorded in the adapter's ``adapter_config.json`` under ``task`` (head, blocks, ``id2label``, palette)."""
        return dict(self.metadata)

    def forward(self, images: torch.Tensor, with_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, list]:
        """Logits at the input resolution; with ``with_aux`` also the auxiliary heads' logits (a list)."""
        height, width = images.shape[-2:]
        if self.pad_to is not None:
            images = F.pad(images, (0, -width % self.pad_to[1], 0, -height % self.pad_to[0]))
        wanted = sorted({*self.indices, *self.aux_indices})
        maps = dict(zip(wanted, features(self, images, wanted, self.tower)))
        size = images.shape[-2:]
        logits = resize_to(self.head([maps[i] for i in self.indices]), size)[..., :height, :width]
        if not with_aux:
            return logits
        aux = [
            resize_to(h([maps[i]]), size)[..., :height, :width] for h, i in zip(self.aux_head or [], self.aux_indices)
        ]
        return logits, aux


def _normalize_indices(indices: Sequence[int], depth: int) -> list[int]:
    out = []
    for i in indices:
        if not -depth <= i < depth:
            raise ConfigError(f"head block index {i} is out of range for a backbone of {depth} blocks")
        out.append(i % depth)
    return out


def build(
    model: nn.Module,
    head: str = "upernet",
    num_classes: int = 150,
    indices: Sequence[int] | None = None,
    aux: bool = False,
    tower: str | None = None,
    channels: int | None = None,
    dropout: float = 0.0,
    classes: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
) -> Segmenter:
    """A segmenter of a timm ViT or an open_clip CLIP (its vision tower) with a decode head.

    Example:
        >>> seg = vp.segmentation.build(timm_vit, head="upernet", num_classes=150)
        >>> vp.attach(seg, "lora", r=8)
        >>> seg(images).shape  # (batch, 150, height, width)

    Args:
        model: A timm ViT or open_clip CLIP, with no method attached yet (attach to the segmenter).
        head: ``linear``, ``linear4``, ``setr_pup`` or ``upernet`` (see :mod:`.seg_heads`).
        num_classes: Output classes.
        indices: Blocks the head reads (default per head and depth, :func:`.seg_heads.default_indices`);
            ``setr_pup`` reads the last one and, with ``aux``, gives each other one an auxiliary head.
        aux: SETR-PUP's auxiliary heads (the VPT paper's setting, loss weight 0.4).
        tower: The backbone tower (default: its main vision tower).
        channels: Width of the conv heads (SETR-PUP 256, UperNet 512 by default).
        dropout: Dropout before the classifier.
        classes: Class names in label order (recorded as ``id2label``). palette: An RGB colour per class.

    Raises:
        ConfigError: Unknown head, bad indices, class names that disagree with ``num_classes``.
        IncompatibleMethodError: The model has no patch-grid tower, or methods are attached already.
    """
    if head not in HEADS:
        from ..errors import did_you_mean

        raise ConfigError(
            f"unknown segmentation head '{head}'{did_you_mean(head, HEADS)}; choose one of {', '.join(HEADS)}"
        )
    if methods_of(model):
        raise IncompatibleMethodError("build the segmenter from a plain model, then attach methods to the segmenter")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    if classes is not None and len(classes) != num_classes:
        raise ConfigError(f"{len(classes)} class names given for num_classes={num_classes}")
    t = backbone_of(model).tower(tower)
    if t.tokens is None:
        raise IncompatibleMethodError(f"the '{t.name}' tower has no patch grid to segment on")
    depth, dim, patch = len(t.blocks), t.tokens.dim, t.tokens.patch_size
    chosen = _normalize_indices(indices if indices is not None else default_indices(head, depth), depth)
    needed = inputs_needed(head)
    if not chosen or (needed is not None and len(chosen) != needed):
        raise ConfigError(f"head '{head}' reads {needed or 'at least 1'} block(s), got indices {list(chosen)}")
    if aux and head != "setr_pup":
        raise ConfigError(f"auxiliary heads belong to setr_pup (the VPT paper's setting), not to '{head}'")
    main, aux_indices = (chosen[-1:], chosen[:-1] if aux else []) if head == "setr_pup" else (chosen, [])
    decode = build_head(head, dim, num_classes, len(main), patch, channels, dropout)
    aux_heads = build_aux_heads(dim, num_classes, len(aux_indices), patch, channels) if aux_indices else None
    metadata = {
        "task": "segmentation",
        "head": head,
        "num_classes": num_classes,
        "indices": main,
        "aux_indices": aux_indices,
        "tower": t.name,
    }
    if classes is not None:
        metadata["id2label"] = {str(i): str(c) for i, c in enumerate(classes)}
    if palette is not None:
        metadata["palette"] = [[int(v) for v in colour] for colour in palette]
    device = next(model.parameters()).device
    pad_to = None if t.tokens.pad else (t.tokens.patch_hw or (patch, patch))
    segmenter = Segmenter(model, decode, main, aux_heads, aux_indices, tower, metadata, pad_to)
    segmenter.head.to(device)
    if segmenter.aux_head is not None:
        segmenter.aux_head.to(device)
    return segmenter.train(model.training)
