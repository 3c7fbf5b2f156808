"""OFT (Qiu et al., NeurIPS 2023; in PEFT 0.21's form) on any projection of any backbone, under PEFT's name and
options: the weight's input side turned by a block-diagonal orthogonal matrix, ``W' = W R^T``
(:mod:`visionpeft.layers.oft`); with ``output_side`` its output rows, ``W' = R W``, as LyCORIS, kohya's sd-scripts,
A1111 and ComfyUI turn them (their kohya ``oft_blocks`` files)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, IncompatibleMethodError
from ..layers.oft import OFTUpdate
from ..schema import setting
from .base import register_method
from .weight_space import WeightSpaceConfig, WeightSpaceMethod, input_side


@dataclass
class OFTConfig(WeightSpaceConfig):
    """OFT options: PEFT 0.21's ``OFTConfig`` (``peft/tuners/oft/config.py``) names and defaults: r 0 and
    oft_block_size 32 (give exactly one of them non-zero), module_dropout 0, coft False, eps 6e-5, block_share False,
    use_cayley_neumann True, num_cayley_neumann_terms 5. Where it goes: ``targets`` / ``target_modules``
    (:class:`~visionpeft.methods.weight_space.WeightSpaceConfig`).

    The block size must divide every adapted layer's input side (PEFT changes it to a near divisor with a warning;
    here it is an error naming the layer). With these, ViT-B/16 trains 12 x 2 x 24 x 496 = 285,696 parameters on Q
    and V (``targets``: 24 blocks of 32 x 31 / 2 per slice) and 12 x 24 x 496 = 142,848 on the whole fused qkv
    (``target_modules=["qkv"]``, PEFT's count).

    Attributes:
        r: Number of orthogonal blocks per layer (0: from oft_block_size).
        oft_block_size: Size of each block (0: from r).
        module_dropout: In training, each block is the identity with this probability (PEFT 0.21 builds this
            dropout but never applies it; see :mod:`visionpeft.layers.oft`).
        coft: Constrained OFT: each block's skew matrix kept within ``eps`` of zero.
        eps: COFT's radius (only with coft).
        block_share: One block shared by every position of a layer.
        use_cayley_neumann: The Cayley-Neumann series instead of the exact Cayley transform.
        num_cayley_neumann_terms: Terms of that series.
        output_side: Turn each layer's output rows (``W' = R W``; the block size then divides the output size): the
            OFT of LyCORIS (``diag-oft``) and kohya's files, which hold the exact Cayley transform
            (``use_cayley_neumann=False``). Not PEFT's: such an OFT has no PEFT folder.
    """

    r: int = setting(0, "number of orthogonal blocks per layer (0: from oft_block_size)", min=0)
    oft_block_size: int = setting(32, "size of each orthogonal block (0: from r)", min=0)
    module_dropout: float = setting(0.0, "training: each block is the identity with this probability", min=0, below=1)
    coft: bool = setting(False, "constrained OFT: keep each block's skew matrix within eps of zero")
    eps: float = setting(6e-5, "COFT's radius (only with coft)", above=0)
    block_share: bool = setting(False, "one block shared by every position of a layer")
    use_cayley_neumann: bool = setting(True, "the Cayley-Neumann series instead of the exact Cayley transform")
    num_cayley_neumann_terms: int = setting(5, "terms of the Cayley-Neumann series", min=2)
    output_side: bool = setting(False, "turn the output rows (LyCORIS's / kohya's OFT) instead of the input side")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"method 'oft' needs exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) non-zero "
                "(r x oft_block_size = a layer's input size); set the other to 0"
            )


def divisors_near(size: int, value: int) -> str:
    """The divisors of ``size`` closest to ``value``, in words."""
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    return ", ".join(str(d) for d in sorted(sorted(divisors, key=lambda d: abs(d - value))[:3]))


def blocks_of(option: str, value: int, size: int, name: str, side: str = "input") -> int:
    """``size // value``, after checking that ``value`` (a block size or count) divides ``size`` (of the ``side``
    turned).

    Raises:
        ConfigError: It does not (one line naming the layer and the nearest divisors)."""
    if size % value:
        raise ConfigError(
            f"{option} {value} does not divide the {side} size {size} of {name}; divisors of {size} near it: "
            f"{divisors_near(size, value)}"
        )
    return size // value


def plain_conv_problem(method: str, name: str, layer: nn.Module) -> str | None:
    """Why an orthogonal method cannot turn a conv's kernel (grouped or dilated, as PEFT refuses), or None."""
    if not isinstance(layer, nn.Conv2d):
        return None
    if layer.groups != 1:
        return f"{name} is a grouped convolution (groups={layer.groups}); {method} adapts groups=1 only"
    if tuple(layer.dilation) != (1, 1):
        return f"{name} is a dilated convolution; {method} adapts dilation 1 only, as PEFT"
    return None


@register_method
class OFT(WeightSpaceMethod):
    name = "oft"
    config_class = OFTConfig
    peft_type = "OFT"
    peft_fields = (
        "r",
        "oft_block_size",
        "module_dropout",
        "coft",
        "eps",
        "block_share",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
    )
    peft_fixed = {"init_weights": True, "bias": "none", "fan_in_fan_out": False}
    export_formats = frozenset({"peft", "kohya"})
    #: A rotation of the input side folds before additive updates of the same layer (0): another method's forward
    #: hook on it (FacT) adds its increment outside the rotation.
    merge_priority = -1

    def new_update(self, name: str, weight: torch.Tensor, layer: nn.Module) -> OFTUpdate:
        cfg = self.config
        problem = plain_conv_problem(self.name, name, layer)
        if problem:
            raise IncompatibleMethodError(problem)
        side = "output" if cfg.output_side else "input"
        size = weight.shape[0] if cfg.output_side else input_side(layer, weight)
        if cfg.oft_block_size:
            block_size = cfg.oft_block_size
            blocks_of("oft_block_size", block_size, size, name, side)
        else:
            block_size = blocks_of("oft r", cfg.r, size, name, side)
        return OFTUpdate(
            size,
            block_size,
            coft=cfg.coft,
            eps=cfg.eps,
            block_share=cfg.block_share,
            use_cayley_neumann=cfg.use_cayley_neumann,
            num_cayley_neumann_terms=cfg.num_cayley_neumann_terms,
            module_dropout=cfg.module_dropout,
            output_side=cfg.output_side,
        )

    def peft_tensors(self, update: OFTUpdate, layer: nn.Module) -> dict[str, torch.Tensor]:
        if self.config.output_side:
            raise CheckpointError(
                "an oft with output_side=True has no PEFT layout (PEFT's OFT turns the input side); save with "
                "format='kohya' or 'visionpeft'"
            )
        return {"oft_R.weight": update.oft_R.detach()}  # PEFT keeps it in an OFTRotationModule

    def lycoris_tensors(self, update: OFTUpdate, layer: nn.Module) -> dict[str, torch.Tensor]:
        """LyCORIS's ``diag-oft`` layout: ``oft_blocks`` (blocks, b, b) holding the strict upper triangle of each
        block's Q (Q = B - B^T), shared blocks repeated, COFT's projection applied; ``alpha`` 0 (LyCORIS's own
        constraint, a bound on the norm of all blocks together, off).

        Raises:
            CheckpointError: PEFT's input-side form (LyCORIS, kohya, A1111 and ComfyUI turn the output side), or the
                Cayley-Neumann series (their files hold the exact Cayley transform)."""
        cfg = self.config
        if not cfg.output_side or cfg.use_cayley_neumann:
            problem = (
                "turns the input side (PEFT's OFT) where LyCORIS, kohya, A1111 and ComfyUI turn the output side"
                if not cfg.output_side
                else "uses the Cayley-Neumann series where LyCORIS, kohya, A1111 and ComfyUI use the exact Cayley form"
            )
            raise CheckpointError(
                f"this oft {problem}; attach oft with output_side=True and use_cayley_neumann=False for a kohya file"
            )
        vector = update.constrained().detach().expand(update.blocks, -1)
        blocks = vector.new_zeros(update.blocks, update.block_size, update.block_size)
        blocks[:, update.triu_rows, update.triu_cols] = vector
        return {"oft_blocks": blocks, "alpha": torch.tensor(0.0)}
