"""OFT (Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023, arXiv 2306.07280,
in the form PEFT has used since 0.18): the weight's input side turned by a block-diagonal orthogonal matrix,
``W' = W R^T`` with ``R = diag(R_1, ..., R_r)``, each block the Cayley transform of a skew-symmetric matrix.

Follows PEFT 0.21's OFT layer (``peft/tuners/oft/layer.py``; own code): ``oft_R`` holds the strict upper triangle of
each block's skew matrix Q ((r, b (b - 1) / 2); one shared block with ``block_share``), zero at initialisation (R is
the identity: unchanged); R is the Cayley-Neumann series ``I + 2Q + 2Q^2 + 2Q^3 + Q^4`` (5 terms) (PEFT >= 0.18's
default, ``use_cayley_neumann``) or the exact ``(I - Q)(I + Q)^-1``; COFT (``coft``) projects each block's Q into a
Frobenius ball of radius ``eps / sqrt(blocks)`` before every use, in place, as PEFT does. PEFT rotates the input of a
Linear (``x R``, then the base layer), which is the same map as the weight ``W R^T`` of its merge; this layer does
the same on a whole Linear (:meth:`OFTUpdate.turned_input`) and uses the weight on slices and convolutions. A
conv's input side is its flattened kernel (in_channels x kh x kw): there PEFT 0.21's forward (an unfold / fold of the
input) is not its own merge and not unchanged at initialisation for kernels larger than 1x1; this layer is what
PEFT's merged layer computes.

``output_side`` turns the weight's output rows instead, ``W' = R W`` (block b of the rows turned by R_b): the OFT of
LyCORIS (``diag-oft``), kohya's sd-scripts, A1111 and ComfyUI, whose files hold full blocks B with Q = B - B^T and
the exact Cayley transform (``(I + Q)(I - Q)^-1`` applied as ``W' = R^T W``, which is ``(I - Q)(I + Q)^-1 W``,
:func:`cayley` of Q). PEFT has no such form.

Module dropout: PEFT 0.21 builds its ``MultiplicativeDropoutLayer`` (in training, ``int(p * blocks)`` random blocks
replaced by the identity; none with a shared block) but never calls it; here it runs as documented, so with
``module_dropout > 0`` training steps differ from PEFT's (evaluation and merge do not).
"""

from __future__ import annotations

import torch
from torch import nn

from .weight_update import WeightUpdate


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """The exact Cayley transform ``(I - S)(I + S)^-1`` of a batch of skew-symmetric matrices, solved in float32 as
    PEFT does (then cast back)."""
    eye = torch.eye(skew.shape[-1], device=skew.device).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(skew.dtype)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's Cayley-Neumann series of a batch of skew-symmetric matrices Q: ``I + 2Q + 2Q^2 + ... +
    2Q^(terms - 2) + Q^(terms - 1)`` for ``terms`` >= 4 (5, the default: ``I + 2Q + 2Q^2 + 2Q^3 + Q^4``), ``I + 2Q +
    2Q^2 + Q^3`` for 3 and ``I + 2Q`` for 2, term for term as PEFT sums them."""
    rotation = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).repeat(skew.shape[0], 1, 1)
    if terms > 1:
        rotation = torch.add(rotation, skew, alpha=2.0)
    if terms > 2:
        power = torch.bmm(skew, skew)
        rotation = torch.add(rotation, power, alpha=2.0)
        for _ in range(3, terms - 1):
            power = torch.bmm(power, skew)
            rotation = torch.add(rotation, power, alpha=2.0)
        rotation = rotation + torch.bmm(power, skew)
    return rotation


def identity_dropout(blocks: torch.Tensor, probability: float, one_factor: bool) -> torch.Tensor:
    """PEFT's multiplicative dropout: ``int(probability * D)`` of the D blocks, chosen at random, replaced by the
    identity. ``blocks`` is (N, D, b, b); with ``one_factor`` (BOFT's) only in one factor of the N, drawn first."""
    factors, count, size = blocks.shape[0], blocks.shape[1], blocks.shape[-1]
    chosen = int(torch.randint(0, factors, (1,)).item()) if one_factor else None
    dropped = int(probability * count)
    mask = torch.cat([torch.ones(dropped), torch.zeros(count - dropped)])[torch.randperm(count)]
    full = torch.zeros(factors, count, 1, 1)
    if one_factor:
        full[chosen] = mask.view(count, 1, 1)
    else:
        full[:] = mask.view(1, count, 1, 1)
    full = full.to(device=blocks.device, dtype=blocks.dtype)
    eye = torch.eye(size, device=blocks.device, dtype=blocks.dtype)
    return (1 - full) * blocks + full * eye


def rotate_input_side(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``W diag(R_1, ..., R_n)^T`` for a 2-D ``weight`` (out, n b) and ``blocks`` (n, b, b), block by block (no
    dense block-diagonal matrix)."""
    rows, (count, size) = weight.shape[0], blocks.shape[:2]
    turned = torch.einsum("onk,nck->onc", weight.reshape(rows, count, size), blocks)
    return turned.reshape(rows, count * size)


class OFTUpdate(WeightUpdate):
    """The OFT rotation of one weight slice's input side (or output rows).

    Args:
        size: Size of the side turned: the input side (a Linear's in_features; a conv's in_channels x kh x kw), or
            the output rows with ``output_side``.
        block_size: Size b of each orthogonal block; ``size / b`` blocks.
        coft: Constrained OFT (project Q before each use). eps: COFT's radius.
        block_share: One block shared by all positions.
        use_cayley_neumann / num_cayley_neumann_terms: The series instead of the exact Cayley transform.
        module_dropout: Probability of each block being the identity in a training forward.
        output_side: Turn the output rows (``W' = R W``, LyCORIS's form) instead of the input side.
    """

    def __init__(
        self,
        size: int,
        block_size: int,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        use_cayley_neumann: bool = True,
        num_cayley_neumann_terms: int = 5,
        module_dropout: float = 0.0,
        output_side: bool = False,
    ) -> None:
        super().__init__()
        self.block_size, self.blocks, self.output_side = block_size, size // block_size, output_side
        self.coft, self.eps, self.module_dropout = coft, eps, module_dropout
        self.use_cayley_neumann, self.num_cayley_neumann_terms = use_cayley_neumann, num_cayley_neumann_terms
        self.oft_R = nn.Parameter(torch.zeros(1 if block_share else self.blocks, block_size * (block_size - 1) // 2))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("triu_rows", rows, persistent=False)
        self.register_buffer("triu_cols", cols, persistent=False)

    def skew(self, vector: torch.Tensor) -> torch.Tensor:
        """The skew-symmetric blocks whose strict upper triangles are the rows of ``vector``."""
        upper = vector.new_zeros(vector.shape[0], self.block_size, self.block_size)
        upper[:, self.triu_rows, self.triu_cols] = vector
        return upper - upper.transpose(-2, -1)

    def constrained(self) -> torch.Tensor:
        """``oft_R`` as the rotation uses it: with COFT each block's Q scaled into the Frobenius ball of radius
        ``eps / sqrt(blocks)``, else ``oft_R`` itself."""
        if not self.coft:
            return self.oft_R
        skew = self.skew(self.oft_R)
        radius = self.eps / torch.sqrt(torch.tensor(float(skew.shape[0])))
        norm = torch.norm(skew, dim=(1, 2), keepdim=True)
        inside = torch.where(norm <= radius, skew, radius * (skew / norm))
        return inside[:, self.triu_rows, self.triu_cols]

    @torch.no_grad()
    def project(self) -> None:
        """COFT: :meth:`constrained` written into ``oft_R``, in place, as PEFT does before every use."""
        self.oft_R.copy_(self.constrained())

    def rotations(self, sample: bool = False) -> torch.Tensor:
        """The orthogonal blocks, one per position of the side turned ((size / b, b, b))."""
        if self.coft:
            self.project()
        skew = self.skew(self.oft_R)
        if self.use_cayley_neumann:
            blocks = cayley_neumann(skew, self.num_cayley_neumann_terms)
        else:
            blocks = cayley(skew)
        if sample and self.module_dropout > 0 and blocks.shape[0] > 1:
            blocks = identity_dropout(blocks[None], self.module_dropout, one_factor=False)[0]
        return blocks.expand(self.blocks, -1, -1)

    def turned_input(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor | None:
        """``x R`` block by block (PEFT's forward), which the frozen Linear maps as ``W R^T`` maps ``x``; None with
        ``output_side``."""
        if self.output_side:
            return None
        blocks = self.rotations(sample).to(x.dtype)
        turned = torch.einsum("...nk,nkc->...nc", x.reshape(*x.shape[:-1], self.blocks, self.block_size), blocks)
        return turned.reshape(x.shape)

    def updated(self, weight: torch.Tensor, sample: bool = False) -> torch.Tensor:
        blocks = self.rotations(sample).to(weight.dtype)
        if self.output_side:  # block by block over the output rows: R_b W_b
            return torch.bmm(blocks, weight.reshape(self.blocks, self.block_size, -1)).reshape(weight.shape)
        turned = rotate_input_side(weight.reshape(weight.shape[0], -1), blocks)
        return turned.reshape(weight.shape)
