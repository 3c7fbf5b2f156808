"""Low-rank update layers (LoRA, Hu et al. 2021) for Linear, Conv2d and ``nn.MultiheadAttention``.

Each layer wraps a frozen ``base`` module and adds ``scale * B @ A`` to some of its output slices. A slice is a
named row range of the base weight: a plain Linear has one slice covering all rows, timm's fused ``qkv`` Linear
has the slices ``q``, ``k`` and ``v``, so a LoRA on Q and V only is two slices of one layer. Initialisation
follows the reference ``loralib``: A kaiming-uniform (a=sqrt(5)), B zero, so the wrapped model starts unchanged.

DoRA (Liu et al., ICML 2024, arXiv 2402.09353) is an option of every layer here (``enable_dora``): each updated
output row ``i`` of the weight becomes ``m_i * (W + scale B A)_i / ||(W + scale B A)_i||``, with a trainable
magnitude ``m`` initialised to the row norms of ``W`` (so the model still starts unchanged). As the paper suggests
(sec. 4.3) and PEFT does (its only behaviour), the norm is treated as a constant in the backward pass (detached): ``m``
and ``B A`` get gradients, the norm does not. Rows outside the updated slices keep scale 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mha import WeightSpaceAttention


def row_norms(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output row of ``weight + delta`` (a conv weight's row is one output channel's kernel).

    The one formula for DoRA's magnitude at initialisation and its norm in every forward, so that at initialisation
    (``delta`` exactly zero) ``magnitude / norm`` is exactly 1 and the output exactly the base layer's."""
    return torch.linalg.vector_norm((weight + delta).flatten(1), dim=1)


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
        self.register_parameter("magnitude", None)  # DoRA's, see enable_dora

    def enable_dora(self, weight: torch.Tensor) -> None:
        """Adds DoRA's magnitude vector, one entry per output row of ``weight`` (the rows this update changes)."""
        with torch.no_grad():
            self.magnitude = nn.Parameter(row_norms(weight, self.delta_weight().to(weight.dtype)))

    def dora_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """``magnitude / ||W + delta W||`` per output row, the norm detached (DoRA sec. 4.3)."""
        with torch.no_grad():
            norm = row_norms(weight, self.delta_weight().to(weight.dtype))
        return self.magnitude / norm

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
        self.dora = False  # set by the subclasses: the updates are DoRA ones (each has a magnitude vector)
        self._merge_scales: dict[str, torch.Tensor] = {}

    def _base_without_bias(self, x: torch.Tensor, out: torch.Tensor, bias_shape: tuple, fn) -> torch.Tensor:
        """The base layer's output without its bias, on the (dropped-out) LoRA input ``x``: DoRA rescales it. With
        no dropout active this is ``out - bias`` (no second product), as in PEFT's DoRA layers."""
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return out - self.base.bias.view(bias_shape) if self.base.bias is not None else out
        return fn(x)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


def merge_update(weight: torch.Tensor, update: LoRAUpdate, sign: float, scales: dict, key: str) -> None:
    """Folds ``update`` into (``sign=1``) or out of (``sign=-1``) the base weight rows ``weight``, in place.

    LoRA adds ``delta W``. DoRA sets the rows to ``m / ||W + delta W|| * (W + delta W)``; the scale used is kept in
    ``scales[key]`` because the merged weight alone no longer says what the norm was, and unmerging divides by it."""
    delta = update.delta_weight().to(weight.dtype)
    if update.magnitude is None:
        weight += sign * delta
        return
    shape = (-1,) + (1,) * (weight.dim() - 1)
    if sign > 0:
        scales[key] = scale = update.dora_scale(weight).detach().to(weight.dtype)
        weight.copy_(scale.view(shape) * (weight + delta))
    else:
        weight.copy_(weight / scales.pop(key).view(shape) - delta)


class LoRALinear(_WrappedLayer):
    """A frozen Linear plus low-rank (optionally DoRA) updates on named output slices.

    Args:
        base: The Linear to adapt.
        slices: Slice name -> (start, stop) output rows, e.g. ``{"q": (0, 768), "v": (1536, 2304)}``.
        r: Rank. alpha: Scaling numerator. dropout: Dropout on the LoRA input.
        dora: Make every update a DoRA one (a magnitude per row of its slice).
    """

    def __init__(
        self,
        base: nn.Linear,
        slices: dict[str, tuple[int, int]],
        r: int,
        alpha: float,
        dropout: float,
        dora: bool = False,
    ):
        super().__init__()
        self._setup(base, dropout)
        self.slices = dict(slices)
        self.updates = nn.ModuleDict(
            {name: LoRAUpdate(base.in_features, stop - start, r, alpha) for name, (start, stop) in slices.items()}
        )
        self.to(device=base.weight.device, dtype=base.weight.dtype)
        self.dora = dora
        if dora:
            for name, (start, stop) in self.slices.items():
                self.updates[name].enable_dora(base.weight[start:stop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        x = self.dropout(x)
        if len(self.slices) == 1 and next(iter(self.slices.values())) == (0, self.base.out_features):
            update = next(iter(self.updates.values()))
            low_rank = F.linear(F.linear(x, update.lora_A), update.lora_B) * update.scale
        else:
            # Several slices (Q and V of a fused qkv): one low-rank product of rank sum(r) with a block-structured
            # B, added out of place - two chains with in-place slice adds cost more kernels and copies in backward.
            a, b = self.stacked()
            low_rank = F.linear(F.linear(x, a), b)
        if not self.dora:
            return out + low_rank
        # DoRA: g (W x + delta W x) + bias = out + (g - 1) W x + g delta W x, with g = m / ||W + delta W||.
        scale = self.dora_scales()
        plain = self._base_without_bias(x, out, (-1,), lambda x: F.linear(x, self.base.weight))
        return out + (scale - 1) * plain + scale * low_rank

    def dora_scales(self) -> torch.Tensor:
        """DoRA's ``magnitude / norm`` for every output row of the layer: 1 on rows outside the updated slices."""
        weight, parts, end = self.base.weight, [], 0
        for name, (start, stop) in sorted(self.slices.items(), key=lambda item: item[1][0]):
            if start > end:
                parts.append(weight.new_ones(start - end))
            parts.append(self.updates[name].dora_scale(weight[start:stop]))
            end = stop
        if end < self.base.out_features:
            parts.append(weight.new_ones(self.base.out_features - end))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def magnitude_vector(self) -> torch.Tensor:
        """The DoRA magnitude of every output row (PEFT's ``lora_magnitude_vector`` of the whole layer): the
        slices' magnitudes, and on other rows their norm, which makes PEFT's scale 1 there as here."""
        weight, parts, end = self.base.weight.detach(), [], 0
        for name, (start, stop) in sorted(self.slices.items(), key=lambda item: item[1][0]):
            if start > end:
                parts.append(row_norms(weight[end:start], torch.zeros_like(weight[end:start])))
            parts.append(self.updates[name].magnitude.detach())
            end = stop
        if end < self.base.out_features:
            parts.append(row_norms(weight[end:], torch.zeros_like(weight[end:])))
        return torch.cat(parts)

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
            merge_update(self.base.weight[start:stop], self.updates[name], sign, self._merge_scales, name)
        self.merged = sign > 0


class LoRAConv2d(_WrappedLayer):
    """A frozen Conv2d plus a low-rank (optionally DoRA, one magnitude per output channel) update: A is a conv with
    the base's geometry and r outputs, B a 1x1 conv."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float, dora: bool = False) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        self._setup(base, dropout)
        k = tuple(base.kernel_size)
        self.update = LoRAUpdate(base.in_channels * math.prod(k), base.out_channels, r, alpha, kernel_size=k)
        self.to(device=base.weight.device, dtype=base.weight.dtype)
        self.dora = dora
        if dora:
            self.update.enable_dora(base.weight)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(x, weight, None, b.stride, b.padding, b.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        u = self.update
        x = self.dropout(x)
        low_rank = F.conv2d(self._conv(x, u.lora_A), u.lora_B) * u.scale
        if not self.dora:
            return out + low_rank
        scale = u.dora_scale(self.base.weight).view(1, -1, 1, 1)
        plain = self._base_without_bias(x, out, (1, -1, 1, 1), lambda x: self._conv(x, self.base.weight))
        return out + (scale - 1) * plain + scale * low_rank

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        merge_update(self.base.weight, self.update, sign, self._merge_scales, "update")
        self.merged = sign > 0


class LoRAMultiheadAttention(WeightSpaceAttention):
    """``nn.MultiheadAttention`` with low-rank updates on any of its q, k, v and output projections.

    ``nn.MultiheadAttention`` keeps q/k/v in one ``in_proj_weight`` that its functional forward reads directly,
    so the updates are applied in weight space: each forward uses ``W + scale * B @ A``. This is exact and costs
    one (d x r) @ (r x d) product per projection, small next to the attention itself. LoRA dropout cannot be
    applied in weight space, so it is rejected here.
    """

    def __init__(
        self, base: nn.MultiheadAttention, slots: tuple[str, ...], r: int, alpha: float, dora: bool = False
    ) -> None:
        super().__init__(base)
        d = base.embed_dim
        self.updates = nn.ModuleDict({slot: LoRAUpdate(d, d, r, alpha) for slot in slots})
        self._merge_scales: dict[str, torch.Tensor] = {}
        self.to(device=base.in_proj_weight.device, dtype=base.in_proj_weight.dtype)
        if dora:
            for slot in slots:
                self.updates[slot].enable_dora(self.slot_weight(slot))

    def _updated(self, slot: str) -> torch.Tensor:
        """A projection's weight with its update: ``W + delta W``, or with DoRA ``g (W + delta W)``."""
        weight, update = self.slot_weight(slot), self.updates[slot]
        new = weight + update.delta_weight()
        return new if update.magnitude is None else update.dora_scale(weight)[:, None] * new

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        parts = [self._updated(slot) if slot in self.updates else self.slot_weight(slot) for slot in "qkv"]
        out_w = self._updated("o") if "o" in self.updates else self.base.out_proj.weight
        return torch.cat(parts), self.base.in_proj_bias, out_w, self.base.out_proj.bias

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        for slot, update in self.updates.items():
            merge_update(self.slot_weight(slot), update, sign, self._merge_scales, slot)
        self.merged = sign > 0
