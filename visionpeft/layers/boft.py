"""BOFT (Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024): OFT whose
orthogonal matrix is a product of m butterfly factors ``R = M_m ... M_1``, ``M_i = P_i diag(R_i1, ..., R_iD) P_i^T``,
and a scale per output row: ``W' = (W R^T) * s``.

Follows PEFT 0.21's BOFT layer (``peft/tuners/boft/layer.py``; own code): ``boft_R`` (m, D, b, b) zero and
``boft_s`` (out, 1) one at initialisation (unchanged), each block the exact Cayley transform of ``(A - A^T) / 2``,
``P_1`` the identity and ``P_i`` (i > 1) PEFT's block-butterfly permutation (:func:`butterfly_permutation`), the
dropout that replaces ``int(p * D)`` blocks of one randomly drawn factor by the identity in training. PEFT's forward
``(x R) W^T`` then ``(. - bias) * s + bias`` is the weight ``(W R^T) * s`` used here and in its merge. PEFT builds
the product with its CUDA block-diagonal kernel and, where that kernel does not build (no CUDA, no ninja), quietly
uses one factor whatever ``boft_n_butterfly_factor`` says; this layer computes every factor on any device.
"""

from __future__ import annotations

import torch
from torch import nn

from .oft import cayley, identity_dropout, rotate_input_side
from .weight_update import WeightUpdate


def butterfly_permutation(size: int, block_size: int, level: int) -> torch.Tensor:
    """PEFT's block-butterfly permutation of butterfly factor ``level`` (1, 2, ...) on an input side of ``size``:
    within each chunk of ``block_size * 2**level`` entries, the half blocks (``block_size / 2`` entries) at even
    positions first, then those at odd positions. Entry i of the result is the index ``P[i]`` holds its 1 at."""
    half, chunk = block_size // 2, block_size * 2**level
    order = [*range(0, chunk // half, 2), *range(1, chunk // half, 2)]
    within = torch.cat([torch.arange(position * half, (position + 1) * half) for position in order])
    return torch.cat([start + within for start in range(0, size, chunk)])


class BOFTUpdate(WeightUpdate):
    """The BOFT rotation and output scale of one weight slice.

    Args:
        rows: Output rows of the slice (one scale each).
        fan_in: Size of the input side (a Linear's in_features; a conv's in_channels x kh x kw).
        block_num / block_size: D blocks of size b per factor, D b = fan_in.
        factors: The number m of butterfly factors.
        dropout: Probability of a block of one factor being the identity in a training forward.
    """

    def __init__(
        self, rows: int, fan_in: int, block_num: int, block_size: int, factors: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.boft_R = nn.Parameter(torch.zeros(factors, block_num, block_size, block_size))
        self.boft_s = nn.Parameter(torch.ones(rows, 1))
        levels = [butterfly_permutation(fan_in, block_size, level) for level in range(1, factors)]
        permutations = torch.stack(levels) if levels else torch.zeros(0, fan_in, dtype=torch.long)
        self.register_buffer("permutations", permutations, persistent=False)
        self.register_buffer("inverse_permutations", torch.argsort(permutations, dim=-1), persistent=False)

    def rotations(self, sample: bool = False) -> torch.Tensor:
        """The orthogonal blocks of every factor, (m, D, b, b)."""
        factors, count, size, _ = self.boft_R.shape
        parameters = self.boft_R.view(factors * count, size, size)
        blocks = cayley(0.5 * (parameters - parameters.transpose(1, 2))).view(factors, count, size, size)
        if sample and self.dropout > 0:
            blocks = identity_dropout(blocks, self.dropout, one_factor=True)
        return blocks

    def updated(self, weight: torch.Tensor, sample: bool = False) -> torch.Tensor:
        turned = weight.reshape(weight.shape[0], -1)
        for level, blocks in enumerate(self.rotations(sample).to(weight.dtype)):
            if level == 0:  # P_1 is the identity
                turned = rotate_input_side(turned, blocks)
            else:  # W M^T = ((W P) diag(R)^T) P^T, the permutations as column gathers
                gathered = turned[:, self.inverse_permutations[level - 1]]
                turned = rotate_input_side(gathered, blocks)[:, self.permutations[level - 1]]
        return (turned * self.boft_s.to(weight.dtype)).reshape(weight.shape)
