"""LoHa (FedPara, Hyeon-Woo et al., ICLR 2022; LyCORIS) on any projection of any backbone, under PEFT's name and
options: ``delta W = alpha / r * (W1a W1b) * (W2a W2b)`` (:mod:`visionpeft.layers.loha`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers.loha import LoHaUpdate
from ..schema import setting
from .base import register_method
from .weight_space import WeightSpaceConfig, WeightSpaceMethod


@dataclass
class LoHaConfig(WeightSpaceConfig):
    """LoHa options: PEFT 0.21's ``LoHaConfig`` (``peft/tuners/loha/config.py``) names and defaults: r 8, alpha 8,
    rank_dropout 0, module_dropout 0, use_effective_conv2d False. Where it goes: ``targets`` / ``target_modules``
    (:class:`~visionpeft.methods.weight_space.WeightSpaceConfig`).

    With these, ViT-B/16 trains 12 x 2 x 2 x (768 x 8 + 8 x 768) = 589,824 parameters on Q and V (``targets``), and
    the same on the whole fused qkv (``target_modules=["qkv"]``: 12 x 2 x (2304 x 8 + 8 x 768), PEFT's count).

    Attributes:
        r: Rank of each of the two products.
        alpha: delta W is scaled by ``alpha / r``.
        rank_dropout: In training, each output row of delta W is dropped with this probability (the mask divided by
            its mean).
        module_dropout: In training, the whole delta W is left out with this probability.
        use_effective_conv2d: For convolutions larger than 1x1, CP factors over the kernel (FedPara's
            Proposition 3): 2 r^2 kh kw + 2 r (out + in) parameters instead of 2 r (out + in kh kw).
    """

    r: int = setting(8, "rank of each of the two products", min=1)
    alpha: float = setting(8.0, "delta W is scaled by alpha / r", above=0)
    rank_dropout: float = setting(
        0.0, "training: drop each output row of delta W with this probability", min=0, below=1
    )
    module_dropout: float = setting(0.0, "training: leave the whole delta W out with this probability", min=0, below=1)
    use_effective_conv2d: bool = setting(False, "CP factors over the kernel of convolutions larger than 1x1")


@register_method
class LoHa(WeightSpaceMethod):
    name = "loha"
    config_class = LoHaConfig
    peft_type = "LOHA"
    peft_fields = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d")
    peft_fixed = {"init_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
    export_formats = frozenset({"peft", "kohya"})

    def new_update(self, name: str, weight: torch.Tensor, layer: nn.Module) -> LoHaUpdate:
        cfg = self.config
        return LoHaUpdate(
            weight.shape, cfg.r, cfg.alpha, cfg.rank_dropout, cfg.module_dropout, cfg.use_effective_conv2d
        )
