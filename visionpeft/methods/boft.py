"""BOFT (Liu et al., ICLR 2024) on any projection of any backbone, under PEFT's name and options: OFT whose
orthogonal matrix is a product of butterfly factors, and a scale per output row (:mod:`visionpeft.layers.boft`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, IncompatibleMethodError
from ..layers.boft import BOFTUpdate
from ..schema import setting
from .base import register_method
from .oft import blocks_of, plain_conv_problem
from .weight_space import WeightSpaceConfig, WeightSpaceMethod, input_side


@dataclass
class BOFTConfig(WeightSpaceConfig):
    """BOFT options: PEFT 0.21's ``BOFTConfig`` (``peft/tuners/boft/config.py``) names and defaults:
    boft_block_size 4 and boft_block_num 0 (give exactly one of them non-zero), boft_n_butterfly_factor 1,
    boft_dropout 0. Where it goes: ``targets`` / ``target_modules``
    (:class:`~visionpeft.methods.weight_space.WeightSpaceConfig`).

    The block size (or count) must divide every adapted layer's input side, and with m > 1 factors the count must
    be even and a multiple of 2^(m - 1) (PEFT's rules; one line naming the layer). With these, ViT-B/16 trains
    12 x 2 x (192 x 4 x 4 + 768) = 92,160 parameters on Q and V (``targets``) and 12 x (192 x 4 x 4 + 2304) =
    64,512 on the whole fused qkv (``target_modules=["qkv"]``, PEFT's count). ``boft_n_butterfly_factor > 1`` runs
    on any device here; PEFT computes it only where its CUDA extension builds (elsewhere it uses one factor, so a
    PEFT folder of such an adapter loads there only).

    Attributes:
        boft_block_size: Size of each orthogonal block (0: from boft_block_num).
        boft_block_num: Number of blocks per butterfly factor (0: from boft_block_size).
        boft_n_butterfly_factor: Number of butterfly factors (1: OFT's block-diagonal matrix, plus the scale).
        boft_dropout: In training, blocks of one randomly chosen factor are the identity with this probability.
    """

    boft_block_size: int = setting(4, "size of each orthogonal block (0: from boft_block_num)", min=0)
    boft_block_num: int = setting(0, "number of blocks per butterfly factor (0: from boft_block_size)", min=0)
    boft_n_butterfly_factor: int = setting(1, "number of butterfly factors (1: block-diagonal, as OFT)", min=1)
    boft_dropout: float = setting(0.0, "training: blocks of one random factor are the identity", min=0, below=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                f"method 'boft' needs exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}) non-zero (their product is a layer's input size); set the other to 0"
            )


def butterfly_blocks(cfg: BOFTConfig, size: int, name: str) -> tuple[int, int]:
    """``(block count, block size)`` of a layer whose input side is ``size``, checked by PEFT's rules.

    Raises:
        ConfigError: A block size or count not dividing ``size``, or one the butterfly factors do not fit."""
    extra = cfg.boft_n_butterfly_factor - 1  # factors beyond the first, PEFT's internal count
    if cfg.boft_block_num:
        count = cfg.boft_block_num
        block_size = blocks_of("boft_block_num", count, size, name)
        if extra and (extra > int(math.log2(count)) or count % 2**extra):
            raise ConfigError(
                f"boft_n_butterfly_factor {cfg.boft_n_butterfly_factor} needs boft_block_num to be a multiple of "
                f"{2**extra}, got {count} for {name}"
            )
    else:
        block_size = cfg.boft_block_size
        count = blocks_of("boft_block_size", block_size, size, name)
        if extra and size % (block_size * 2**extra):
            raise ConfigError(
                f"boft_n_butterfly_factor {cfg.boft_n_butterfly_factor} with boft_block_size {block_size} needs an "
                f"input size that is a multiple of {block_size * 2**extra}; {name} has {size}"
            )
    if extra and (count % 2 or block_size % 2):
        raise ConfigError(
            f"boft_n_butterfly_factor {cfg.boft_n_butterfly_factor} needs an even block count and size; {name} gets "
            f"{count} blocks of {block_size}"
        )
    return count, block_size


@register_method
class BOFT(WeightSpaceMethod):
    name = "boft"
    config_class = BOFTConfig
    peft_type = "BOFT"
    peft_fields = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout")
    peft_fixed = {"init_weights": True, "bias": "none", "fan_in_fan_out": False}
    #: As OFT's: the rotation folds before additive updates of the same layer.
    merge_priority = -1

    def new_update(self, name: str, weight: torch.Tensor, layer: nn.Module) -> BOFTUpdate:
        cfg = self.config
        problem = plain_conv_problem(self.name, name, layer)
        if problem:
            raise IncompatibleMethodError(problem)
        size = input_side(layer, weight)
        count, block_size = butterfly_blocks(cfg, size, name)
        return BOFTUpdate(weight.shape[0], size, count, block_size, cfg.boft_n_butterfly_factor, cfg.boft_dropout)

    def peft_tensors(self, update: BOFTUpdate, layer: nn.Module) -> dict[str, torch.Tensor]:
        scale = update.boft_s.detach()
        return {"boft_R": update.boft_R.detach(), "boft_s": scale.t() if isinstance(layer, nn.Conv2d) else scale}
