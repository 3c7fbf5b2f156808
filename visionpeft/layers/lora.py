"""Low-rank update layers (LoRA, Hu et al. 2021) for Linear, Conv2d and ``nn.MultiheadAttention``.

Each layer wraps a frozen ``base`` module and adds ``scale * B @ A`` to some of its output slices. A slice is a
named row range of the base weight: a plain Linear has one slice covering all rows, timm's fused ``qkv`` Linear
has the slices ``q``, ``k`` and ``v``, so a LoRA on Q and V only is two slices of one layer. Initialisation
follows the reference ``loralib``: A kaiming-uniform (a=sqrt(5)), B zero, so the wrapped model starts unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAUpdate(nn.Module):
    """The trainable factors of one low-rank update: ``delta W = scale * B @ A``.

    Args:
        in_features: Input size of A (for a conv: ``in_channels * kh * kw``).
        out_features: Output size of B.
        r: Rank.
        alpha: Scaling numerator; the update is scaled by ``alpha / r``.
        kernel_size: For a Conv2d base, its kernel size; A is then stored as a conv weight.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, kernel_size: tuple = ()) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.r = r
        self.scale = alpha / r
        a_shape = (r, in_features // max(1, math.prod(kernel_size)), *kernel_size) if kernel_size else (r, in_features)
        b_shape = (out_features, r, 1, 1) if kernel_size else (out_features, r)
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """Returns ``scale * B @ A`` shaped like the slice of the base weight it updates."""
        a = self.lora_A.flatten(1)
        delta = (self.lora_B.flatten(1) @ a) * self.scale
        return delta.view(self.lora_B.shape[0], *self.lora_A.shape[1:])


class _WrappedLayer(nn.Module):
    """A layer around a frozen ``base``: code that reads ``.weight`` / ``.bias`` of the wrapped layer keeps working."""

    _vp_wrapper = True

    def _setup(self, base: nn.Module, dropout: float) -> None:
        self.base = base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


class LoRALinear(_WrappedLayer):
    """A frozen Linear plus low-rank updates on named output slices.

    Args:
        base: The Linear to adapt.
        slices: Slice name -> (start, stop) output rows, e.g. ``{"q": (0, 768), "v": (1536, 2304)}``.
        r: Rank. alpha: Scaling numerator. dropout: Dropout on the LoRA input.
    """

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], r: int, alpha: float, dropout: float):
        super().__init__()
        self._setup(base, dropout)
        self.slices = dict(slices)
        self.updates = nn.ModuleDict(
            {name: LoRAUpdate(base.in_features, stop - start, r, alpha) for name, (start, stop) in slices.items()}
        )
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        x = self.dropout(x)
        if len(self.slices) == 1 and next(iter(self.slices.values())) == (0, self.base.out_features):
            update = next(iter(self.updates.values()))
            return out + F.linear(F.linear(x, update.lora_A), update.lora_B) * update.scale
        # Several slices (Q and V of a fused qkv): one low-rank product of rank sum(r) with a block-structured B,
        # added out of place - two chains with in-place slice adds cost more kernels and copies in backward.
        a, b = self.stacked()
        return out + F.linear(F.linear(x, a), b)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All slices' updates as one LoRA on the whole layer: ``(A, B)`` with A the slices' A matrices stacked and B
        ``(out_features, sum(r))`` holding each slice's ``scale * B`` in its rows and columns, zero elsewhere."""
        updates = list(self.updates.items())
        a = torch.cat([u.lora_A for _, u in updates]) if len(updates) > 1 else updates[0][1].lora_A
        rank, columns, col = a.shape[0], {}, 0
        for name, u in updates:
            columns[name], col = col, col + u.r
        rows, end = [], 0
        for name, (start, stop) in sorted(self.slices.items(), key=lambda item: item[1][0]):
            u = self.updates[name]
            if start > end:
                rows.append(a.new_zeros(start - end, rank))
            rows.append(F.pad(u.lora_B * u.scale, (columns[name], rank - columns[name] - u.r)))
            end = stop
        if end < self.base.out_features:
            rows.append(a.new_zeros(self.base.out_features - end, rank))
        return a, torch.cat(rows)

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        """Adds (``sign=1``) or removes (``sign=-1``) the updates to / from the base weight."""
        for name, (start, stop) in self.slices.items():
            self.base.weight[start:stop] += sign * self.updates[name].delta_weight().to(self.base.weight.dtype)
        self.merged = sign > 0


class LoRAConv2d(_WrappedLayer):
    """A frozen Conv2d plus a low-rank update: A is a conv with the base's geometry and r outputs, B a 1x1 conv."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        self._setup(base, dropout)
        k = tuple(base.kernel_size)
        self.update = LoRAUpdate(base.in_channels * math.prod(k), base.out_channels, r, alpha, kernel_size=k)
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        b = self.base
        low = F.conv2d(self.dropout(x), self.update.lora_A, None, b.stride, b.padding, b.dilation)
        return out + F.conv2d(low, self.update.lora_B) * self.update.scale

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        self.base.weight += sign * self.update.delta_weight().to(self.base.weight.dtype)
        self.merged = sign > 0


class LoRAMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with low-rank updates on any of its q, k, v and output projections.

    ``nn.MultiheadAttention`` keeps q/k/v in one ``in_proj_weight`` that its functional forward reads directly,
    so the updates are applied in weight space: each forward uses ``W + scale * B @ A``. This is exact and costs
    one (d x r) @ (r x d) product per projection, small next to the attention itself. LoRA dropout cannot be
    applied in weight space, so it is rejected here.
    """

    _vp_wrapper = True

    def __init__(self, base: nn.MultiheadAttention, slots: tuple[str, ...], r: int, alpha: float) -> None:
        super().__init__()
        if not base._qkv_same_embed_dim:
            raise ValueError("LoRA needs nn.MultiheadAttention with equal q/k/v embedding sizes")
        self.base = base
        d = base.embed_dim
        self.updates = nn.ModuleDict({slot: LoRAUpdate(d, d, r, alpha) for slot in slots})
        self.merged = False
        self.to(device=base.in_proj_weight.device, dtype=base.in_proj_weight.dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # batch_first, embed_dim, num_heads, ... of the wrapped module
            return getattr(super().__getattr__("base"), name)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        in_w, out_w = self.base.in_proj_weight, self.base.out_proj.weight
        if self.merged:
            return in_w, out_w
        d = self.base.embed_dim
        parts = []
        for i, slot in enumerate(("q", "k", "v")):
            w = in_w[i * d : (i + 1) * d]
            parts.append(w + self.updates[slot].delta_weight() if slot in self.updates else w)
        if "o" in self.updates:
            out_w = out_w + self.updates["o"].delta_weight()
        return torch.cat(parts), out_w

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
        in_w, out_w = self._weights()
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            base.embed_dim,
            base.num_heads,
            in_w,
            base.in_proj_bias,
            base.bias_k,
            base.bias_v,
            base.add_zero_attn,
            base.dropout,
            out_w,
            base.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return (out.transpose(0, 1) if base.batch_first else out), weights

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        d = self.base.embed_dim
        for i, slot in enumerate(("q", "k", "v")):
            if slot in self.updates:
                self.base.in_proj_weight[i * d : (i + 1) * d] += sign * self.updates[slot].delta_weight()
        if "o" in self.updates:
            self.base.out_proj.weight += sign * self.updates["o"].delta_weight()
        self.merged = sign > 0
