"""One wrapper layer for every method that changes a layer's weight: LoHa and LoKr add a delta W, OFT and BOFT turn
the weight's input side by an orthogonal matrix (BOFT also scales its output rows).

A method's part is one :class:`WeightUpdate` per slice of a weight: all rows of a Linear, the Q or V rows of timm's
fused qkv, a Conv2d weight, or one projection of ``nn.MultiheadAttention``. Given the frozen weight of its slice it
returns the slice's effective weight (:meth:`WeightUpdate.updated`), and an additive update also its delta
(:meth:`WeightUpdate.delta`). The wrappers serve every layer kind with that one function:

- :class:`WeightSpaceLayer` (Linear with output slices, Conv2d). An additive update runs as PEFT's LyCORIS layers
  do, ``base(x) + x delta W^T`` (for a Conv2d the base's convolution with the delta), so a hook another method put
  on the base layer sees the base output alone, as with a LoRA. Any other update calls the base layer with its
  effective weight in place of its own (``torch.func.functional_call``), so hooks on the base layer still run; a
  whole Linear whose update turns its input side (OFT) runs as PEFT's OFT does, the base layer on the turned input
  ``x R`` (:meth:`WeightUpdate.turned_input`, no gradient of a full weight), unless a pre-hook on the base layer
  would then see the turned input instead of ``x``.
- :class:`WeightSpaceMultiheadAttention`: the functional attention forward on the effective weights
  (:class:`~visionpeft.layers.mha.WeightSpaceAttention`).

``merge`` writes each slice's effective weight into the base weight: the function the forward uses, so merged and
unmerged outputs agree to rounding. Training-time randomness (dropouts) is drawn only when the forward asks for it
(``sample=True``), never by a merge.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .mha import WeightSpaceAttention


class WeightUpdate(nn.Module):
    """A method's trainable change of one weight slice; subclasses hold the method's factors under the names PEFT
    and LyCORIS give them."""

    #: The update adds a delta W to the weight (LoHa, LoKr); otherwise it transforms the weight (OFT, BOFT).
    additive: ClassVar[bool] = False

    def delta(self, weight: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """The additive change of ``weight`` (shaped like it); ``sample``: draw the training-time dropouts."""
        raise NotImplementedError(f"{type(self).__name__} is no additive update")

    def updated(self, weight: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """The effective weight of the slice whose frozen weight is ``weight`` (same shape and dtype)."""
        return weight + self.delta(weight, sample).to(weight.dtype)

    def turned_input(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor | None:
        """For an update that is a map of a Linear's input side (``W' = W R^T``): the input ``x R`` that the frozen
        layer turns into the updated layer's output; None for any other update."""
        return None


def update_skipped(probability: float) -> bool:
    """Module dropout of PEFT's LyCORIS layers: the whole update is left out with ``probability`` (one draw of the
    global generator on every training forward, as PEFT draws it whatever the probability)."""
    return not bool(torch.rand(1) > probability)


def row_dropout(delta: torch.Tensor, probability: float, renormalise: bool) -> torch.Tensor:
    """Rank dropout of PEFT's LyCORIS layers: each output row of ``delta`` is kept with ``1 - probability`` (one draw
    per row from the global CPU generator), the mask divided by its mean when ``renormalise``."""
    keep = (torch.rand(delta.shape[0]) > probability).to(delta.dtype)
    keep = keep.view(-1, *[1] * (delta.dim() - 1)).to(delta.device)
    if renormalise:
        keep = keep / keep.mean()
    return delta * keep


class WeightSpaceLayer(nn.Module):
    """A frozen Linear or Conv2d whose named output-row slices carry :class:`WeightUpdate` s.

    Code that reads ``.weight`` / ``.bias`` of the wrapped layer keeps reading the base layer's.

    Args:
        base: The Linear or Conv2d to adapt.
        slices: Slice name -> (start, stop) output rows, e.g. ``{"q": (0, 768), "v": (1536, 2304)}``; one slice over
            all rows for a whole layer.
        updates: Slice name -> its update (built for the slice's weight shape); all additive or all not.
    """

    _vp_wrapper = True

    def __init__(
        self, base: nn.Linear | nn.Conv2d, slices: dict[str, tuple[int, int]], updates: dict[str, WeightUpdate]
    ) -> None:
        super().__init__()
        self.base = base
        self.slices = dict(sorted(slices.items(), key=lambda item: item[1][0]))
        self.updates = nn.ModuleDict(updates)
        self.additive = all(u.additive for u in updates.values())
        if not self.additive and any(u.additive for u in updates.values()):
            raise ValueError("the updates of one layer must all be additive or all not")
        self.merged = False
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def whole(self) -> bool:
        """One update covers every output row (a whole module, as PEFT adapts them)."""
        return list(self.slices.values()) == [(0, self.base.weight.shape[0])]

    def _assembled(self, of_slice, of_gap) -> torch.Tensor:
        """The full weight-shaped tensor made of ``of_slice(update, rows)`` on the slices and ``of_gap(rows)``
        between them."""
        weight, parts, end = self.base.weight, [], 0
        for name, (start, stop) in self.slices.items():
            if start > end:
                parts.append(of_gap(weight[end:start]))
            parts.append(of_slice(self.updates[name], weight[start:stop]))
            end = stop
        if end < weight.shape[0]:
            parts.append(of_gap(weight[end:]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def effective_weight(self, sample: bool = False) -> torch.Tensor:
        """The weight the layer computes with: each slice updated, the rows between them the base's."""
        return self._assembled(lambda update, rows: update.updated(rows, sample), lambda rows: rows)

    def delta_weight(self, sample: bool = False) -> torch.Tensor:
        """The additive updates' delta W over all rows (zero between the slices)."""
        return self._assembled(lambda update, rows: update.delta(rows, sample), torch.zeros_like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.additive:
            delta = self.delta_weight(self.training)
            if isinstance(self.base, nn.Conv2d):
                return self.base(x) + self.base._conv_forward(x, delta, None)
            return self.base(x) + F.linear(x, delta)
        turned = self._turned_input(x)
        if turned is not None:
            return self.base(turned)
        return functional_call(self.base, {"weight": self.effective_weight(self.training)}, (x,))

    def _turned_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole Linear's turned input when its update is an input-side map and no pre-hook on the base layer
        reads the input (with one, the base layer is called on ``x`` with its effective weight); else None."""
        if not self.whole or not isinstance(self.base, nn.Linear) or self.base._forward_pre_hooks:
            return None
        (update,) = self.updates.values()
        return update.turned_input(x, self.training)

    @torch.no_grad()
    def merge(self) -> None:
        """Writes the effective weight into the base layer's weight; the forward then runs the base layer."""
        weight = self.base.weight
        for name, (start, stop) in self.slices.items():
            rows = weight[start:stop]
            rows.copy_(self.updates[name].updated(rows))
        self.merged = True


class WeightSpaceMultiheadAttention(WeightSpaceAttention):
    """``nn.MultiheadAttention`` with :class:`WeightUpdate` s on any of its ``q``, ``k``, ``v``, ``o`` projections,
    applied in weight space (its functional forward reads the weights, so no layer can be hooked).

    Args:
        base: The attention module. updates: Slot (``q``, ``k``, ``v``, ``o``) -> its update.
    """

    def __init__(self, base: nn.MultiheadAttention, updates: dict[str, WeightUpdate]) -> None:
        super().__init__(base)
        self.updates = nn.ModuleDict(updates)
        self.to(device=base.in_proj_weight.device, dtype=base.in_proj_weight.dtype)

    def _slot(self, slot: str) -> torch.Tensor:
        weight = self.slot_weight(slot)
        return self.updates[slot].updated(weight, self.training) if slot in self.updates else weight

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        in_w = torch.cat([self._slot(slot) for slot in "qkv"])
        return in_w, self.base.in_proj_bias, self._slot("o"), self.base.out_proj.bias

    @torch.no_grad()
    def merge(self) -> None:
        for slot, update in self.updates.items():
            weight = self.slot_weight(slot)
            weight.copy_(update.updated(weight))
        self.merged = True
