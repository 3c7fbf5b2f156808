"""LoKr (Yeh et al., ICLR 2024; LyCORIS) on any projection of any backbone, under PEFT's name and options:
``delta W = alpha / r * kron(W1, W2)`` (:mod:`visionpeft.layers.lokr`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers.lokr import LoKrUpdate
from ..schema import setting
from .base import register_method
from .weight_space import WeightSpaceConfig, WeightSpaceMethod


@dataclass
class LoKrConfig(WeightSpaceConfig):
    """LoKr options: PEFT 0.21's ``LoKrConfig`` (``peft/tuners/lokr/config.py``) names and defaults: r 8, alpha 8,
    rank_dropout 0, module_dropout 0, rank_dropout_scale False, use_effective_conv2d False, decompose_both False,
    decompose_factor -1. Where it goes: ``targets`` / ``target_modules``
    (:class:`~visionpeft.methods.weight_space.WeightSpaceConfig`).

    With these, ViT-B/16 trains 12 x 2 x (24 x 24 + 32 x 8 + 8 x 32) = 26,112 parameters on Q and V (``targets``;
    768 = 24 x 32) and 12 x (48 x 24 + 48 x 8 + 8 x 32) = 21,504 on the whole fused qkv (``target_modules=["qkv"]``;
    2304 = 48 x 48, PEFT's count).

    Attributes:
        r: Rank of the decomposed Kronecker factors.
        alpha: delta W is scaled by ``alpha / r``.
        rank_dropout: In training, each output row of delta W is dropped with this probability.
        module_dropout: In training, the whole delta W is left out with this probability.
        rank_dropout_scale: Divide the rank-dropout mask by its mean.
        use_effective_conv2d: For convolutions larger than 1x1, CP factors for the second Kronecker factor.
        decompose_both: Also write the first factor as a rank-r product (when r < max of its sides / 2).
        decompose_factor: Split sizes into a factor of this size and the rest when it divides them; -1: near the
            square root.
    """

    r: int = setting(8, "rank of the decomposed Kronecker factors", min=1)
    alpha: float = setting(8.0, "delta W is scaled by alpha / r", above=0)
    rank_dropout: float = setting(
        0.0, "training: drop each output row of delta W with this probability", min=0, below=1
    )
    module_dropout: float = setting(0.0, "training: leave the whole delta W out with this probability", min=0, below=1)
    rank_dropout_scale: bool = setting(False, "divide the rank-dropout mask by its mean")
    use_effective_conv2d: bool = setting(False, "CP factors over the kernel of convolutions larger than 1x1")
    decompose_both: bool = setting(False, "also write the first Kronecker factor as a rank-r product")
    decompose_factor: int = setting(-1, "split sizes into this factor and the rest; -1: near the square root", min=-1)


@register_method
class LoKr(WeightSpaceMethod):
    name = "lokr"
    config_class = LoKrConfig
    peft_type = "LOKR"
    peft_fields = (
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "rank_dropout_scale",
        "use_effective_conv2d",
        "decompose_both",
        "decompose_factor",
    )
    peft_fixed = {"init_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
    export_formats = frozenset({"peft", "kohya"})

    def new_update(self, name: str, weight: torch.Tensor, layer: nn.Module) -> LoKrUpdate:
        cfg = self.config
        return LoKrUpdate(
            weight.shape,
            cfg.r,
            cfg.alpha,
            rank_dropout=cfg.rank_dropout,
            module_dropout=cfg.module_dropout,
            rank_dropout_scale=cfg.rank_dropout_scale,
            use_effective_conv2d=cfg.use_effective_conv2d,
            decompose_both=cfg.decompose_both,
            decompose_factor=cfg.decompose_factor,
        )

    def lycoris_tensors(self, update: LoKrUpdate, layer: nn.Module) -> dict[str, torch.Tensor]:
        """LyCORIS's layout of the factors. With both factors dense there is no rank to divide alpha by: LyCORIS,
        A1111 and ComfyUI then scale by 1, so the scale is folded into ``lokr_w1`` (alpha written as r, as LyCORIS
        writes it)."""
        tensors = super().lycoris_tensors(update, layer)
        if "lokr_w1" in tensors and "lokr_w2" in tensors:
            tensors["lokr_w1"] = tensors["lokr_w1"] * update.scale
            tensors["alpha"] = torch.tensor(float(self.config.r))
        return tensors
