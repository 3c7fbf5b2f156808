"""Ratios over benchmark rounds: each round measures both sides, so the per-round ratios say how steady a ratio is."""

from __future__ import annotations

import statistics


def ratio_spread(ours: list[dict], reference: list[dict], key: str) -> str:
    """``min / median / max`` of ``ours[i][key] / reference[i][key]`` over the rounds ``i``."""
    ratios = sorted(a[key] / max(b[key], 1e-12) for a, b in zip(ours, reference))
    return f"{ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f}"
