"""Convpass (Jie & Deng, 2022): convolutional bypasses beside each block's attention and MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers.adapters import ConvBypass
from ..registry import METHODS
from ..schema import setting
from .base import Method, MethodConfig


@dataclass
class ConvpassConfig(MethodConfig):
    """Convpass options; defaults are the official code's (JieShibo/PETL-ViT ``convpass.py``:
    ``set_Convpass(model, method, dim=8, s=1, xavier_init=False)``, ``nn.Dropout(0.1)``). The VTAB-1k configs
    choose ``scale`` per task (CIFAR-100: 0.1). ViT-B/16 trains
    12 x 2 x (768 x 8 + 8 + 8 x 8 x 9 + 8 + 8 x 768 + 768) = 327,552 parameters.

    Attributes:
        dim: Width of the bypass (the paper's d).
        scale: Multiplier ``s`` of the bypass output.
        dropout: Dropout before the up-projection.
        xavier_init: Xavier-initialise the 3x3 conv instead of starting it at the identity.
    """

    dim: int = setting(8, "width of the bypass (the paper's d)", min=1)
    scale: float = setting(1.0, "multiplier s of the bypass output", above=0)
    dropout: float = setting(0.1, "dropout before the up-projection", min=0, below=1)
    xavier_init: bool = setting(False, "xavier-initialise the 3x3 conv instead of starting at the identity")


@METHODS.register("convpass")
class Convpass(Method):
    name = "convpass"
    config_class = ConvpassConfig
    requires = {"tokens": "a ViT-style token sequence with a patch grid"}

    def build(self) -> None:
        cfg, layout = self.config, self.tower.tokens
        for block in self.blocks():
            for branch_name in ("attn", "mlp"):
                bypass = ConvBypass(layout.dim, cfg.dim, cfg.dropout)
                if cfg.xavier_init:
                    nn.init.xavier_uniform_(bypass.conv.weight)
                self.add_module(block.module, f"{block.name}.{branch_name}.convpass", bypass)
                # x + f(norm(x)) + s * bypass(norm(x)): the bypass sees the branch's (normalised) input
                self.hook_tokens_output(block.branches[branch_name].module, self._add, bypass)

    def _add(self, bypass: ConvBypass, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        layout = self.tower.tokens
        grid = layout.grid_for(x.shape[1] - layout.total_prefix)  # the recorded grid of the actual input
        return output + bypass(x, layout.total_prefix, grid) * self.config.scale
