"""CoCoOp's base-to-new score: the harmonic mean of the base and new classes' accuracies (stdlib only)."""

from __future__ import annotations


def harmonic_mean(base: float, new: float) -> float:
    """The base-to-new protocol's harmonic mean of base and new accuracy (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new else 0.0
