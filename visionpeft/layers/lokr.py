"""LoKr (Yeh et al., "Navigating Text-To-Image Customization", ICLR 2024; LyCORIS): ``delta W = alpha / r *
kron(W1, W2)``, a Kronecker product whose factors split the output and input sizes, each factor dense or a rank-r
product.

Follows PEFT 0.21's LoKr layer (``peft/tuners/lokr/layer.py``; own code): out = a * b and in = c * d by
:func:`factorization` (``decompose_factor``); ``lokr_w1`` (a, c) is dense unless ``decompose_both`` and
r < max(a, c) / 2 (then ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, c)); ``lokr_w2`` (b, d[, kh, kw]) is dense unless
r < max(b, d) / 2 (then ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d kh kw), or with ``use_effective_conv2d`` on a
conv larger than 1x1 CP factors ``lokr_t2`` (r, r, kh, kw), ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d)). PEFT's
initialisation: ``lokr_w1`` (or ``lokr_w1_a``) zero, so the layer starts unchanged, every other factor
kaiming-uniform (a = sqrt(5)); rank dropout (divided by the mask's mean only with ``rank_dropout_scale``) and module
dropout as LoHa's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .loha import cp_weight, kaiming
from .weight_update import WeightUpdate, row_dropout, update_skipped


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Splits ``dimension`` into ``(m, n)`` with ``m * n == dimension``, PEFT's and LyCORIS's rule.

    A positive ``factor`` dividing ``dimension`` gives ``(factor, dimension // factor)`` as it is. Otherwise the
    divisors are walked upwards while they do not pass ``factor`` (-1: no limit) and stay below the square root,
    one step past it included; the pair is returned smaller first: 768 -> (24, 32), 2304 -> (48, 48), 127 ->
    (1, 127); with factor 4, 128 -> (4, 32).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        divisor = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if divisor > limit:
            break
        m, n = divisor, dimension // divisor
    return (m, n) if m <= n else (n, m)


class LoKrUpdate(WeightUpdate):
    """The LoKr factors of one weight slice.

    Args:
        shape: The slice's weight shape, (out, in) or a conv's (out, in / groups, kh, kw).
        r: Rank of the decomposed factors. alpha: The delta is scaled by ``alpha / r``.
        rank_dropout / module_dropout / rank_dropout_scale: Training-time dropouts as in PEFT.
        use_effective_conv2d: CP factors for ``lokr_w2`` of a conv larger than 1x1.
        decompose_both: Also decompose ``lokr_w1`` when r is small enough.
        decompose_factor: The factor :func:`factorization` aims at (-1: near the square root).
    """

    additive = True

    def __init__(
        self,
        shape: tuple[int, ...],
        r: int,
        alpha: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        use_effective_conv2d: bool = False,
        decompose_both: bool = False,
        decompose_factor: int = -1,
    ) -> None:
        super().__init__()
        self.shape, self.scale = tuple(shape), alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rank_dropout_scale = rank_dropout_scale
        kernel = self.shape[2:]
        out_a, out_b = factorization(self.shape[0], decompose_factor)
        in_c, in_d = factorization(self.shape[1], decompose_factor)
        if decompose_both and r < max(out_a, in_c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.zeros(out_a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, in_c))
            kaiming(self.lokr_w1_b)
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(out_a, in_c))
        if r >= max(out_b, in_d) / 2:
            self.lokr_w2 = nn.Parameter(torch.empty(out_b, in_d, *kernel))
            kaiming(self.lokr_w2)
        elif use_effective_conv2d and len(kernel) == 2 and tuple(kernel) != (1, 1):
            self.lokr_w2_a = nn.Parameter(torch.empty(r, out_b))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, in_d))
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *kernel))
            kaiming(self.lokr_w2_a, self.lokr_w2_b, self.lokr_t2)
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, in_d * math.prod(kernel)))
            kaiming(self.lokr_w2_a, self.lokr_w2_b)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two Kronecker factors ``(W1, W2)`` as dense tensors (W2 a kernel when the slice is a conv's)."""
        first = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            second = self.lokr_w2
        elif hasattr(self, "lokr_t2"):
            second = cp_weight(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            second = self.lokr_w2_a @ self.lokr_w2_b
        return first, second

    def delta_weight(self) -> torch.Tensor:
        """``scale * kron(W1, W2)`` shaped like the slice."""
        first, second = self.factors()
        if second.dim() == 4:
            first = first[:, :, None, None]
        return (torch.kron(first, second.contiguous()) * self.scale).reshape(self.shape)

    def delta(self, weight: torch.Tensor, sample: bool = False) -> torch.Tensor:
        if sample and update_skipped(self.module_dropout):
            return torch.zeros_like(weight)
        delta = self.delta_weight()
        if sample and self.rank_dropout:
            delta = row_dropout(delta, self.rank_dropout, renormalise=self.rank_dropout_scale)
        return delta
