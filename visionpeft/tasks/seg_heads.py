"""Decode heads for plain ViTs: each takes the patch-grid maps ``(batch, dim, h, w)`` of the blocks it reads and
returns class logits on (a multiple of) that grid; the :class:`~.segmenter.Segmenter` resizes them to the input.

* ``linear`` / ``linear4``: DINOv2's linear protocol (its ``BNHead``): the maps of one block (or of the last four,
  concatenated on channels), BatchNorm, a 1x1 convolution.
* ``setr_pup``: SETR's progressive upsampling head (mmsegmentation ``SETRUPHead``): LayerNorm over the tokens, then
  stages of 3x3 conv + BN + ReLU + bilinear x2, then a 1x1 classifier; its auxiliary heads (the VPT paper's
  SETR-PUP setting, loss weight 0.4) are the same head with 2 stages of x4 upsampling on earlier blocks.
* ``upernet``: transformers' ``UperNetHead`` (PPM + FPN, reused as it is: its constructor only reads
  ``pool_scales``, ``hidden_size`` and ``num_labels`` from a config) over a ViTDet-style simple feature pyramid built
  from four blocks of one scale: deconv x4, deconv x2, identity, max-pool /2 (BEiT / ViTDet's ``fpn1..fpn4``).

The small conv / norm modules are written here because torchvision's ``Conv2dNormActivation`` is the only kept
building block and it is used; the heads' arrangement has no maintained library implementation besides
mmsegmentation (unmaintained for current torch), whose conventions are followed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

HEADS = ("linear", "linear4", "setr_pup", "upernet")
#: mmsegmentation's auxiliary-loss weight (SETR-PUP, UperNet's FCN head)
AUX_WEIGHT = 0.4


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, as mmsegmentation) unless ``x`` already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class BNLinearHead(nn.Module):
    """DINOv2's linear head: the input maps resized to the first one's grid and concatenated, BatchNorm, dropout,
    a 1x1 convolution.

    Args:
        in_channels: Channels of one input map. num_inputs: How many maps are concatenated (1 or 4).
        num_classes: Output classes. dropout: Dropout before the classifier (DINOv2: 0).
    """

    def __init__(self, in_channels: int, num_inputs: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_inputs = num_inputs
        self.bn = nn.BatchNorm2d(in_channels * num_inputs)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(in_channels * num_inputs, num_classes, kernel_size=1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([resize_to(m, maps[0].shape[-2:]) for m in maps], dim=1)
        return self.classifier(self.dropout(self.bn(x)))


class SETRUpHead(nn.Module):
    """SETR's progressive-upsampling head on one block's map.

    Args:
        in_channels: Token width. num_classes: Output classes. channels: Width of the conv stages (SETR: 256).
        num_convs: Conv stages, each followed by bilinear upsampling by ``up_scale``. dropout: Before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 4,
        up_scale: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        stages = []
        for i in range(num_convs):
            conv = Conv2dNormActivation(in_channels if i == 0 else channels, channels, kernel_size=3, bias=False)
            stages.append(nn.Sequential(conv, nn.Upsample(scale_factor=up_scale, mode="bilinear")))
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x = maps[-1]
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over the channels of each token
        return self.classifier(self.dropout(self.stages(x)))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet / BEiT's pyramid from one scale: four maps of stride ``p`` become strides ``p/4, p/2, p, 2p``
    (two 2x2 transposed convs with BN + GELU between, one transposed conv, identity, 2x2 max-pool)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(m) for op, m in zip((self.up4, self.up2, self.same, self.down2), maps)]


class UperNetDecoder(nn.Module):
    """transformers' ``UperNetHead`` over a :class:`SimpleFeaturePyramid` of four blocks.

    Args:
        in_channels: Token width. num_classes: Output classes. channels: UperNet's width (mmseg: 512).
        pool_scales: The pyramid pooling module's scales.
    """

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetHead

        config = UperNetConfig(pool_scales=list(pool_scales), hidden_size=channels, num_labels=num_classes)
        self.pyramid = SimpleFeaturePyramid(in_channels)
        self.decoder = UperNetHead(config, in_channels=[in_channels] * 4)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.pyramid(maps))


def default_indices(head: str, depth: int) -> list[int]:
    """The blocks a head reads by default in a ``depth``-block tower.

    ``linear``: the last block; ``linear4``: the last four (DINOv2); ``setr_pup`` and ``upernet``: four blocks
    evenly spaced to the last one, mmsegmentation's ViT out_indices (ViT-B 12 blocks: 2, 5, 8, 11; ViT-L 24: 5, 11,
    17, 23); SETR-PUP's main head reads the last of them, its auxiliary heads the others.
    """
    if head == "linear":
        return [depth - 1]
    if head == "linear4":
        return [max(0, depth - 4 + k) for k in range(4)]
    return [max(0, depth * (k + 1) // 4 - 1) for k in range(4)]


def inputs_needed(head: str) -> int | None:
    """How many block maps the head reads (None: any number)."""
    return {"linear": 1, "linear4": None, "setr_pup": None, "upernet": 4}[head]


def build_head(
    head: str,
    dim: int,
    num_classes: int,
    num_inputs: int,
    patch_size: int,
    channels: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """The main decode head.

    Args:
        head: One of :data:`HEADS`. dim: Token width. num_inputs: Block maps it receives.
        patch_size: The backbone's patch size: SETR-PUP's number of x2 stages is ``log2(patch_size)`` (4 for the
            16-px patches of the paper), so its logits come out at the input resolution.
        channels: Width of the conv heads (SETR-PUP 256, UperNet 512 by default).
    """
    if head in ("linear", "linear4"):
        return BNLinearHead(dim, num_inputs, num_classes, dropout)
    if head == "setr_pup":
        stages = max(1, round(math.log2(patch_size)))
        return SETRUpHead(dim, num_classes, channels or 256, num_convs=stages, up_scale=2, dropout=dropout)
    if head == "upernet":
        return UperNetDecoder(dim, num_classes, channels or 512)
    raise ValueError(head)


def build_aux_heads(
    dim: int, num_classes: int, count: int, patch_size: int, channels: int | None = None
) -> nn.ModuleList:
    """SETR-PUP's auxiliary heads, one per earlier block: 2 stages of upsampling by ``sqrt(patch_size)``
    (mmsegmentation's config for 16-px patches: 2 stages of x4)."""
    up = max(1, round(math.sqrt(patch_size)))
    return nn.ModuleList(SETRUpHead(dim, num_classes, channels or 256, num_convs=2, up_scale=up) for _ in range(count))
