"""Convpass (Jie & Deng, 2022): convolutional bypasses beside each block's attention and MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers.adapters import ConvBypass
from ..schema import setting
from .base import Method, MethodConfig, register_method


@dataclass
class ConvpassConfig(MethodConfig):
    """Convpass options; defaults are the official code's (JieShibo/PETL-ViT ``convpass.py``:
    ``set_Convpass(model, method, dim=8, s=1, xavier_init=False)``, ``nn.Dropout(0.1)``). The bypasses add past the
    block's layer scale and drop path, each with a drop-path mask of its own at the block's rate (``forward_block``:
    ``x + dp(attn(norm1(x))) + dp(adapter_attn(norm1(x))) * s``). ``configs/vtab/convpass/<task>.yaml`` hold the
    official per-task ``scale`` / ``xavier_init`` (CIFAR-100: 0.1, no xavier). ViT-B/16 trains
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


@register_method
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
                # the official block: x + dp(f(norm(x))) + dp'(bypass(norm(x))) * s, dp' a drop-path mask of its own
                branch = block.branches[branch_name]
                self.hook_past_branch(branch, branch.module, self._bypass, bypass, drop_path=True)

    def _bypass(self, bypass: ConvBypass, x: torch.Tensor) -> torch.Tensor:
        layout = self.tower.tokens
        grid = layout.grid_for(x.shape[1] - layout.total_prefix)  # the recorded grid of the actual input
        return bypass(x, layout.total_prefix, grid) * self.config.scale
