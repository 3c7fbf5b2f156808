"""LoHa (FedPara, Hyeon-Woo et al., ICLR 2022; LyCORIS): ``delta W = alpha / r * (W1a W1b) * (W2a W2b)``, the
Hadamard product of two rank-r products (rank up to r^2 for the parameters of a rank-2r LoRA).

Follows PEFT 0.21's LoHa layer (``peft/tuners/loha/layer.py``; own code): the factor names and shapes
(``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), the same for ``w2``; a Conv2d's ``in`` is in_channels / groups x
kh x kw), the initialisation (``w1_a``, ``w1_b``, ``w2_a`` kaiming-uniform with a = sqrt(5), ``w2_b`` zero, so the
layer starts unchanged), rank dropout (output rows of delta W dropped, the mask divided by its mean) and module
dropout (the whole delta left out), drawn from the global generator in PEFT's order. ``use_effective_conv2d``
(FedPara's Proposition 3) on a Conv2d larger than 1x1: CP factors ``hada_t1`` / ``hada_t2`` (r, r, kh, kw) with
``w*_a`` (r, out) and ``w*_b`` (r, in_channels / groups), also kaiming-uniform.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .weight_update import WeightUpdate, row_dropout, update_skipped


def kaiming(*parameters: nn.Parameter) -> None:
    """The kaiming-uniform initialisation (a = sqrt(5)) of PEFT's and LyCORIS's factors, in the order given."""
    for parameter in parameters:
        nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))


def cp_weight(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A conv kernel from CP factors: ``core`` (r, r, kh, kw), ``out_factor`` (r, out), ``in_factor`` (r, in) ->
    (out, in, kh, kw)."""
    return torch.einsum("ijkl,jr,ip->prkl", core, in_factor, out_factor)


class LoHaUpdate(WeightUpdate):
    """The LoHa factors of one weight slice.

    Args:
        shape: The slice's weight shape, (out, in) or a conv's (out, in / groups, kh, kw).
        r: Rank of each product. alpha: The delta is scaled by ``alpha / r``.
        rank_dropout: Probability of dropping an output row of delta W in training.
        module_dropout: Probability of leaving the whole delta out in training.
        use_effective_conv2d: CP factors for a conv kernel larger than 1x1.
    """

    additive = True

    def __init__(
        self,
        shape: tuple[int, ...],
        r: int,
        alpha: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        use_effective_conv2d: bool = False,
    ) -> None:
        super().__init__()
        self.shape, self.scale = tuple(shape), alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        out, kernel = self.shape[0], self.shape[2:]
        self.effective_conv = use_effective_conv2d and len(kernel) == 2 and tuple(kernel) != (1, 1)
        if self.effective_conv:
            a_shape, b_shape = (r, out), (r, self.shape[1])
        else:
            a_shape, b_shape = (out, r), (r, math.prod(self.shape[1:]))
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w2_b = nn.Parameter(torch.zeros(b_shape))
        kaiming(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a)
        if self.effective_conv:
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *kernel))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *kernel))
            kaiming(self.hada_t1, self.hada_t2)

    def delta_weight(self) -> torch.Tensor:
        """``scale * (W1a W1b) * (W2a W2b)`` shaped like the slice (CP-rebuilt kernels for an effective conv)."""
        if self.effective_conv:
            first = cp_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            second = cp_weight(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
            return first * second * self.scale
        product = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (product * self.scale).reshape(self.shape)

    def delta(self, weight: torch.Tensor, sample: bool = False) -> torch.Tensor:
        if sample and update_skipped(self.module_dropout):
            return torch.zeros_like(weight)
        delta = self.delta_weight()
        if sample and self.rank_dropout:
            delta = row_dropout(delta, self.rank_dropout, renormalise=True)
        return delta
