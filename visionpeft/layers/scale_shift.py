"""SSF's per-channel scale and shift (Lian et al., NeurIPS 2022), and ``nn.MultiheadAttention`` with one after its
in-projection and one after its out-projection.

A scale-shift after a layer's output is ``(x W^T + b) * s + t = x (diag(s) W)^T + (s b + t)``: :meth:`ScaleShift.folded`
is that weight and bias, the one function both the weight-space attention's forward and every merge use.
``nn.MultiheadAttention`` reads its projection weights inside one functional call, so there the scale-shifts act on
those weights (:class:`ScaleShiftMultiheadAttention`), which is the same function as scaling the projections' outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .mha import WeightSpaceAttention


class ScaleShift(nn.Module):
    """A per-channel ``scale`` and ``shift``, drawn as the official ``init_ssf_scale_shift``: scale ~ N(1, std),
    shift ~ N(0, std)."""

    def __init__(self, dim: int, std: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=std)
        nn.init.normal_(self.shift, mean=0.0, std=std)

    def apply_to(self, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
        scale, shift = self.scale.to(y.dtype), self.shift.to(y.dtype)
        if channel_dim == 1 and y.dim() == 4:  # (B, C, H, W) conv output
            scale, shift = scale[:, None, None], shift[:, None, None]
        return y * scale + shift

    def folded(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias (new tensors) of the layer this scale-shift follows with it folded in: the output rows
        of ``weight`` times the scale, ``bias * scale + shift`` (the shift alone for a layer without bias)."""
        scale, shift = self.scale.to(weight.dtype), self.shift.to(weight.dtype)
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))  # a Linear's or conv's rows, a norm's entries
        return weight, shift if bias is None else bias * scale + shift


class ScaleShiftMultiheadAttention(WeightSpaceAttention):
    """``nn.MultiheadAttention`` with a :class:`ScaleShift` ``ssf.qkv`` after its in-projection (the q, k and v rows
    of ``in_proj_weight``: as after timm's fused qkv Linear) and ``ssf.o`` after its out-projection.

    Args:
        base: The attention. std: The initialisation's standard deviation.
    """

    def __init__(self, base: nn.MultiheadAttention, std: float) -> None:
        super().__init__(base)
        d = base.embed_dim
        self.ssf = nn.ModuleDict({"qkv": ScaleShift(3 * d, std), "o": ScaleShift(d, std)})
        self.ssf.to(device=base.in_proj_weight.device, dtype=base.in_proj_weight.dtype)

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        base = self.base
        in_w, in_b = self.ssf["qkv"].folded(base.in_proj_weight, base.in_proj_bias)
        return in_w, in_b, *self.ssf["o"].folded(base.out_proj.weight, base.out_proj.bias)

    def missing_bias(self) -> str | None:
        """The base projection without a bias for the shift to fold into (``in_proj_bias`` / ``out_proj.bias``)."""
        if self.base.in_proj_bias is None:
            return "in_proj_bias"
        return "out_proj.bias" if self.base.out_proj.bias is None else None

    @torch.no_grad()
    def merge(self) -> None:
        """Folds both scale-shifts into the base weights and biases (exact; a bias must exist: see
        :meth:`missing_bias`); the forward then runs the base."""
        base = self.base
        parts = ((base.in_proj_weight, base.in_proj_bias, "qkv"), (base.out_proj.weight, base.out_proj.bias, "o"))
        for weight, bias, site in parts:
            new_weight, new_bias = self.ssf[site].folded(weight, bias)
            weight.copy_(new_weight)
            bias.copy_(new_bias)
        self.merged = True
