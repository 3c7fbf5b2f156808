"""Low-rank factors of a weight difference by truncated SVD, in LoRA's shapes; the one SVD the combination
(``*svd``), resize and extraction share.

By Eckart-Young the first ``k`` singular triplets give the closest rank-``k`` matrix in the Frobenius norm; the
relative error left is ``sqrt(sum_{i>k} s_i^2) / sqrt(sum_i s_i^2)``. As sd-scripts (``networks/svd_merge_lora.py``,
``resize_lora.py``, ``extract_lora_from_models.py``) and PEFT (``LoraModel._svd_generalized_task_arithmetic_weighted
_adapter``) do, B takes ``U_k diag(S_k)`` and A takes ``Vh_k``; a conv's ``(out, in, kh, kw)`` difference is read as
the matrix ``(out, in * kh * kw)``, A reshaped to ``(k, in, kh, kw)`` and B to ``(out, k, 1, 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def svd_factors(
    matrix: torch.Tensor, rank: int, full_matrices: bool = False, clamp: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(up, down, S)``: ``matrix ~= up @ down`` with ``up = U_k diag(S_k)``, ``down = Vh_k``, ``k = min(rank,
    len(S))``, and every singular value ``S``.

    Args:
        matrix: ``(out, in)``.
        rank: The rank kept.
        full_matrices: Passed to ``torch.linalg.svd`` (PEFT's ``svd_full_matrices``; the kept triplets are the same).
        clamp: A quantile in (0, 1]: the entries of ``up`` and ``down`` are clamped to ``+-`` that quantile of their
            values taken together (PEFT's ``svd_clamp``, sd-scripts' ``clamp_quantile``); None keeps them.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=full_matrices)
    k = min(rank, s.shape[0])
    up = u[:, :k] @ torch.diag(s[:k])
    down = vh[:k, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    return up, down, s


def lora_shaped(up: torch.Tensor, down: torch.Tensor, a_tail: tuple, b_tail: tuple, rank: int):
    """``(A, B)`` from matrix factors: A ``(k, *a_tail)``, B ``(out, k, *b_tail)`` (a Linear's tails ``(in,)`` and
    ``()``, a conv's ``(in, kh, kw)`` and ``(1, 1)``), the rank dimension zero-padded to ``rank`` (the padding changes
    nothing: its rows of A meet zero columns of B)."""
    k = down.shape[0]
    return pad_rank(down.reshape(k, *a_tail), up.reshape(up.shape[0], k, *b_tail), rank)


def tails(a: torch.Tensor, b: torch.Tensor) -> tuple[tuple, tuple]:
    """The shapes of LoRA factors past the rank dimension: ``(A.shape[1:], B.shape[2:])``."""
    return tuple(a.shape[1:]), tuple(b.shape[2:])


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pads A's rows and B's columns to ``rank``."""
    extra = rank - a.shape[0]
    if extra <= 0:
        return a, b
    a = torch.cat([a, a.new_zeros(extra, *a.shape[1:])])
    b = F.pad(b, (0, 0) * (b.dim() - 2) + (0, extra))
    return a, b


def relative_error(target: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||target - approximation||_F / ||target||_F`` (0 for a zero target approximated exactly)."""
    norm = torch.linalg.vector_norm(target.float())
    error = torch.linalg.vector_norm((target - approximation).float())
    if norm == 0:
        return 0.0 if error == 0 else float("inf")
    return float(error / norm)
