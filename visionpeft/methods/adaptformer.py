"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck MLP in parallel with each block's MLP."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IncompatibleMethodError
from ..layers.adapters import Bottleneck
from ..schema import setting
from .base import Method, MethodConfig, register_method


@dataclass
class AdaptFormerConfig(MethodConfig):
    """AdaptFormer options; defaults are the official code's image recipe (ShoufaChen/AdaptFormer
    ``main_image.py``: ``ffn_num=64``, ``ffn_adapter_scalar="0.1"``, ``ffn_option="parallel"``,
    ``ffn_adapter_layernorm_option="none"``, ``init_option="lora"``; ``Adapter(dropout=0.1)`` in the block).
    VTAB-1k tables use ``bottleneck=8``: 12 x (768 x 8 + 8 + 8 x 768 + 768) = 156,768 parameters on ViT-B/16.

    Attributes:
        bottleneck: Hidden width of the adapter.
        scale: Multiplier of the adapter output.
        dropout: Dropout after the adapter's ReLU.
    """

    bottleneck: int = setting(64, "hidden width of the adapter", min=1)
    scale: float = setting(0.1, "multiplier of the adapter output (the paper's s)", above=0)
    dropout: float = setting(0.1, "dropout after the adapter's ReLU", min=0, below=1)


@register_method
class AdaptFormer(Method):
    name = "adaptformer"
    config_class = AdaptFormerConfig

    def check_fits(self) -> None:
        super().check_fits()
        for block in self.blocks():
            branch = block.branches.get("mlp")
            if branch is None or branch.norm is None:
                raise IncompatibleMethodError(
                    f"adaptformer needs pre-norm transformer blocks with an MLP branch; {block.name} of the "
                    f"{self.backbone.family} '{self.tower.name}' tower has none"
                )

    def build(self) -> None:
        cfg = self.config
        for block in self.blocks():
            branch = block.branches["mlp"]
            dim = branch.output.base_layer().out_features
            adapter = self.add_module(
                block.module, f"{block.name}.mlp.adaptformer", Bottleneck(dim, cfg.bottleneck, cfg.scale, cfg.dropout)
            )
            # The adapter reads the residual stream (the MLP's pre-norm input) and adds past the MLP's layer scale
            # and drop path, with no drop path of its own (the official Block: x = x + dp(mlp(norm2(x))) + adapt_x).
            self.hook_past_branch(branch, branch.norm, adapter)
