"""``nn.MultiheadAttention`` run on projection weights that a method computes (weight space).

``nn.MultiheadAttention`` keeps q/k/v in one ``in_proj_weight`` (and ``in_proj_bias``) that its functional forward
reads directly, and never calls its ``out_proj`` module, so a method changing one of its projections cannot hook a
layer: it hands the functional forward changed weights instead. :class:`WeightSpaceAttention` is that forward; a
subclass says which weights to use (:meth:`WeightSpaceAttention.projection_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base
        if base.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if self.merged:
            in_w, in_b, out_w, out_b = base.in_proj_weight, base.in_proj_bias, base.out_proj.weight, base.out_proj.bias
        else:
            in_w, in_b, out_w, out_b = self.projection_weights()
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            base.embed_dim,
            base.num_heads,
            in_w,
            in_b,
            base.bias_k,
            base.bias_v,
            base.add_zero_attn,
            base.dropout,
            out_w,
            out_b,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return (out.transpose(0, 1) if base.batch_first else out), weights
