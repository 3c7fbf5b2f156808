"""(IA)^3 vectors (Liu et al., NeurIPS 2022, arXiv 2205.05638): a learned vector that multiplies the output channels
of a projection (``l * (W x + b)``), or, for a feed-forward module, its input channels (``W (l * x) + b``).

Both fold into the layer exactly (:func:`scaled_weight`): the rows of W and b times ``l``, or the input columns of W
times ``l`` (per group for a grouped convolution). ``nn.MultiheadAttention`` reads its projection weights inside one
functional call, so there the vectors act on those weights (:class:`IA3MultiheadAttention`), which is the same
function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .mha import WeightSpaceAttention


class IA3Vector(nn.Module):
    """One (IA)^3 vector ``ia3_l`` of ``width`` channels.

    Ones when ``ones`` (the model starts unchanged: ``multi_lora_b`` of the official r-three/t-few
    ``src/models/lora.py``, PEFT's ``init_ia3_weights=True``), else standard normal (PEFT's
    ``init_ia3_weights=False``: ``torch.randn``).
    """

    def __init__(self, width: int, ones: bool = True) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(width) if ones else torch.randn(width))


def scale_channels(x: torch.Tensor, vector: torch.Tensor, channel_first: bool) -> torch.Tensor:
    """``x`` times ``vector`` over its channels: dimension 1 of a convolution's ``(batch, channels, ...)`` when
    ``channel_first``, else the last dimension (a Linear's input or output)."""
    v = vector.to(x.dtype)
    if channel_first:
        v = v.view(-1, *([1] * (x.dim() - 2)))
    return x * v


def row_vector(width: int, pieces: Sequence[tuple[tuple[int, int] | None, IA3Vector]]) -> torch.Tensor:
    """One vector over all ``width`` output rows of a layer from its pieces ``(rows, vector)``: a piece with rows
    None covers the layer; otherwise rows without a piece (q of a fused qkv scaled on k and v only) get 1."""
    if len(pieces) == 1 and pieces[0][0] is None:
        return pieces[0][1].ia3_l
    parts, end = [], 0
    for (start, stop), vector in sorted(pieces, key=lambda piece: piece[0][0]):
        if start > end:
            parts.append(vector.ia3_l.new_ones(start - end))
        parts.append(vector.ia3_l)
        end = stop
    if end < width:
        parts.append(parts[-1].new_ones(width - end))
    return torch.cat(parts)


def scaled_weight(
    weight: torch.Tensor, bias: torch.Tensor | None, vector: torch.Tensor, feedforward: bool, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias (new tensors) of a layer folded with an (IA)^3 vector: the output rows of both times
    ``vector``, or with ``feedforward`` the input columns of the weight (the bias is unchanged); a grouped
    convolution's weight holds ``in_channels / groups`` columns, those of its own group."""
    v = vector.to(weight.dtype)
    trailing = [1] * (weight.dim() - 2)
    if not feedforward:
        return weight * v.view(-1, 1, *trailing), (bias * v if bias is not None else None)
    if groups == 1:
        return weight * v.view(1, -1, *trailing), bias
    out_channels, per_group = weight.shape[:2]
    grouped = weight.view(groups, out_channels // groups, per_group, *weight.shape[2:])
    return (grouped * v.view(groups, 1, per_group, *trailing)).view_as(weight), bias


class IA3MultiheadAttention(WeightSpaceAttention):
    """``nn.MultiheadAttention`` with (IA)^3 vectors on any of its ``q``, ``k``, ``v`` and ``o`` projections, each
    on the projection's output rows or, when it is a feed-forward one, on its input columns.

    Args:
        base: The attention. feedforward: Slot -> whether its vector scales the input. ones: Initialise with ones.
    """

    def __init__(self, base: nn.MultiheadAttention, feedforward: dict[str, bool], ones: bool = True) -> None:
        super().__init__(base)
        self.feedforward = dict(feedforward)
        self.scales = nn.ModuleDict({slot: IA3Vector(base.embed_dim, ones) for slot in feedforward})
        self.scales.to(device=base.in_proj_weight.device, dtype=base.in_proj_weight.dtype)

    def _projection(self, slot: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.slot_weight(slot), self.slot_bias(slot)
        if slot not in self.scales:
            return weight, bias
        return scaled_weight(weight, bias, self.scales[slot].ia3_l, self.feedforward[slot])

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        parts = [self._projection(slot) for slot in "qkv"]
        in_bias = torch.cat([b for _, b in parts]) if self.base.in_proj_bias is not None else None
        return (torch.cat([w for w, _ in parts]), in_bias, *self._projection("o"))

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the vectors into the base weights (exact); the forward then uses those."""
        for slot in self.scales:
            weight, bias = self._projection(slot)
            self.slot_weight(slot).copy_(weight)
            if bias is not None:
                self.slot_bias(slot).copy_(bias)
        self.merged = True
