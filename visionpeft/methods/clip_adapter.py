"""CLIP-Adapter (Gao et al., IJCV 2023), on open_clip's CLIP: a residual bottleneck adapter on the image features.

The image feature ``f`` (the vision tower's projected output, before normalisation) becomes
``ratio * A(f) + (1 - ratio) * f``, ``A = ReLU(Linear(d // reduction -> d, no bias)(ReLU(Linear(d -> d //
reduction, no bias)(f))))``; the logits are ``logit_scale.exp() * cos(f', t_c)`` against the frozen text features
``t_c`` of the hand-crafted prompt ``template.format(c)`` (gaopengcuhk/CLIP-Adapter ``clip_adapter.py``: ``Adapter``
lines 55-67, ``TextEncoder`` lines 70-86, ``CustomCLIP.forward`` lines 100-115 with ``ratio = 0.2`` and
``Adapter(1024, 4)`` for RN50's 1024-d features; ``CUSTOM_TEMPLATES`` lines 18-34). The adapter's Linears keep
PyTorch's default initialisation, as the official module, so the model does not start as zero-shot CLIP. Only the
adapter trains (lines 133-136). The official file computes the class text features anew at every forward pass of the
frozen tower; they are the same each time, so the task model computes them once (``class_text_features``).

The released file has no recipe of its own: its README runs it with CoOp's commands (CoOp's schedule and data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..schema import setting
from .base import Method, MethodConfig, register_method
from .clip_fewshot import check_classnames, check_template, hand_crafted_text_features, require_text_tower


@dataclass
class CLIPAdapterConfig(MethodConfig):
    """CLIP-Adapter options; defaults are the official code's (``Adapter(c_in, 4)``, ``ratio = 0.2``).

    Attributes:
        classnames: The class names, in label order.
        template: The hand-crafted prompt of the class text features.
        reduction: The bottleneck is ``d // reduction`` wide.
        ratio: The residual ratio ``alpha`` of the adapted features.
    """

    tower: str | None = setting("vision", "the tower whose output features are adapted (CLIP's image features)")
    classnames: tuple[str, ...] = setting((), "the class names, in label order (the task fills them in)")
    template: str = setting("a photo of a {}.", "the hand-crafted prompt ({} = class name) of the class text features")
    reduction: int = setting(4, "bottleneck reduction: the adapter's hidden width is d // reduction", min=1)
    ratio: float = setting(0.2, "residual ratio alpha: ratio * adapter(f) + (1 - ratio) * f", min=0, max=1)


class FeatureAdapter(nn.Module):
    """The official ``Adapter``: Linear - ReLU - Linear - ReLU, no biases."""

    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        hidden = dim // reduction
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register_method
class CLIPAdapter(Method):
    name = "clip_adapter"
    config_class = CLIPAdapterConfig
    provides = frozenset({"class_text_features"})
    task_inputs = ("classnames",)

    def check_fits(self) -> None:
        super().check_fits()
        require_text_tower(self)
        cfg = self.config
        if self.tower.name != "vision":
            raise ConfigError(f"{self.name} adapts CLIP's image features: set tower=vision (got {cfg.tower})")
        if not cfg.classnames:
            raise ConfigError(f"{self.name} needs classnames (the class names in label order)")
        check_classnames(self.name, cfg.classnames)
        check_template(self.name, "template", cfg.template)
        if self.backbone.embed_dim // cfg.reduction < 1:
            raise ConfigError(
                f"{self.name} reduction={cfg.reduction} leaves no hidden unit of the {self.backbone.embed_dim}-d "
                "image features; lower reduction"
            )

    def build(self) -> None:
        encoder = self.tower.forward
        if not isinstance(encoder, nn.Module):
            raise ConfigError(f"{self.name} needs the image encoder as a module; this {self.backbone.family} has none")
        adapter = FeatureAdapter(self.backbone.embed_dim, self.config.reduction)
        self.adapter = self.add_module(encoder, self.name, adapter)
        self.text: torch.Tensor | None = None
        self.hook_output(encoder, self._blend)

    def _blend(self, module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor:
        ratio = self.config.ratio
        return ratio * self.adapter(output) + (1 - ratio) * output

    def class_text_features(self) -> torch.Tensor:
        """The ``class_text_features`` capability: the frozen features of the hand-crafted prompts (n_cls, d)."""
        device = self.backbone.logit_scale.device
        if self.text is None or self.text.device != device:
            self.text = hand_crafted_text_features(self.backbone, self.config.classnames, (self.config.template,))
        return self.text
