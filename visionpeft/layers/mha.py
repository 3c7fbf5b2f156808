"""``nn.MultiheadAttention`` run on projection weights that a method computes (weight space).

``nn.MultiheadAttention`` keeps q/k/v in one ``in_proj_weight`` (and ``in_proj_bias``) that its functional forward
reads directly, and never calls its ``out_proj`` module, so a method changing one of its projections cannot hook a
layer: it runs the attention on changed weights instead. :class:`WeightSpaceAttention` is that forward (the base
module's own call, its hooks included, on substituted weights); a subclass says which weights to use
(:meth:`WeightSpaceAttention.projection_weights`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class WeightSpaceAttention(nn.Module):
    """A wrapper of ``base`` (an ``nn.MultiheadAttention`` with equal q / k / v sizes) whose forward is the base's
    on the weights :meth:`projection_weights` returns; once ``merged`` the base's own weights hold them.

    Attribute reads the wrapper does not answer (``batch_first``, ``embed_dim``, ``num_heads``, ...) go to ``base``.
    """

    _vp_wrapper = True

    def __init__(self, base: nn.MultiheadAttention) -> None:
        super().__init__()
        if not base._qkv_same_embed_dim:
            raise ValueError("a method on nn.MultiheadAttention needs equal q/k/v embedding sizes")
        self.base = base
        self.merged = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # batch_first, embed_dim, num_heads, ... of the wrapped module
            return getattr(super().__getattr__("base"), name)

    def slot_weight(self, slot: str) -> torch.Tensor:
        """The base weight rows of one of the ``q``, ``k``, ``v``, ``o`` projections (a view)."""
        if slot == "o":
            return self.base.out_proj.weight
        d, i = self.base.embed_dim, "qkv".index(slot)
        return self.base.in_proj_weight[i * d : (i + 1) * d]

    def slot_bias(self, slot: str) -> torch.Tensor | None:
        """The base bias entries of one of the ``q``, ``k``, ``v``, ``o`` projections (a view), or None."""
        if slot == "o":
            return self.base.out_proj.bias
        bias = self.base.in_proj_bias
        d, i = self.base.embed_dim, "qkv".index(slot)
        return bias[i * d : (i + 1) * d] if bias is not None else None

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(in_proj_weight, in_proj_bias, out_proj weight, out_proj bias)`` the forward uses while not merged."""
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base attention's own call on the projection weights, through ``torch.func.functional_call``: the
        forward hooks other methods put on the base module (DiffFit's gamma on the attention branch) still run."""
        if self.merged:
            return self.base(*args, **kwargs)
        in_w, in_b, out_w, out_b = self.projection_weights()
        tensors = {"in_proj_weight": in_w, "in_proj_bias": in_b, "out_proj.weight": out_w, "out_proj.bias": out_b}
        tensors = {name: tensor for name, tensor in tensors.items() if tensor is not None}
        return torch.func.functional_call(self.base, tensors, args, kwargs)
