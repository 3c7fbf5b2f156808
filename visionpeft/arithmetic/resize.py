"""A LoRA truncated by SVD to a lower rank, or to the rank keeping a fraction of its energy (kohya-ss/sd-scripts
``networks/resize_lora.py``, read at commit 48d368f).

Per update, as sd-scripts' ``resize_lora_model``: the product ``B @ A`` without the scale (``merge_linear`` /
``merge_conv``) is decomposed by SVD (``extract_linear`` / ``extract_conv``: ``B = U_k diag(S_k)``, ``A = Vh_k``)
and the scale ``alpha / r`` is kept (sd-scripts writes ``alpha = scale * new_rank``). The rank ``k``:

- ``rank`` alone: ``min(rank, r)`` (sd-scripts' fixed ``--new_rank``; a rank-``r`` update has ``r`` directions).
- ``energy``: sd-scripts' ``rank_resize`` with ``--dynamic_method sv_fro --dynamic_param sqrt(energy)``
  (``index_sv_fro``): the fewest singular values whose squares keep ``energy`` of ``sum(S^2)``, clipped to
  ``[1, len(S) - 1]``, **plus one** (sd-scripts adds it), at most ``rank`` and the update's rank ``r``; an update
  whose largest singular value is at most 1e-6 gets rank 1 (sd-scripts' ``MIN_SV``).

visionpeft's ``lora`` has one rank per method, so an energy-resized method is stored at the largest kept rank, the
other updates zero-padded (exact; PEFT / kohya exports keep those zero rows). DoRA's magnitudes are kept as they are
(the direction update is resized; the error reported is the update's). The relative error per update is
``||B A - B' A'||_F / ||B A||_F``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import ConfigError
from .lowrank import lora_shaped, relative_error, svd_factors, tails
from .records import LORA, AdapterResult, LayerFit, LoRAGroup, check_output, method_entry, read_adapter

#: sd-scripts' ``MIN_SV``: an update whose largest singular value is at most this is a zero update (rank 1).
MIN_SINGULAR_VALUE = 1e-6


def resize_lora(
    adapter: Any, rank: int | None = None, energy: float | None = None, output: str | os.PathLike | None = None
) -> AdapterResult:
    """Resizes every LoRA update of an adapter by SVD (see the module docstring for the rank rule).

    Args:
        adapter: A visionpeft adapter folder or a model carrying a loaded LoRA (other methods and the task heads
            are kept as they are).
        rank: The new rank; with ``energy``, the largest rank allowed. At most the adapter's rank.
        energy: Keep this fraction, in (0, 1], of each update's energy (sum of squared singular values).
        output: A new or empty folder to write the visionpeft folder to (else use ``result.save(folder)``).

    Returns:
        The resized adapter (:class:`AdapterResult`, ``layers``: each update's rank and relative error).

    Raises:
        ConfigError: Neither ``rank`` nor ``energy``, values out of range, a rank above the adapter's, no LoRA.
        CheckpointError: An unreadable folder.
    """
    if rank is None and energy is None:
        raise ConfigError("resize_lora needs rank (the new rank) or energy (the fraction of energy to keep)")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ConfigError(f"energy is the fraction of energy to keep, in (0, 1]; got {energy!r}")
    if output is not None:
        check_output(output, [adapter])
    record = read_adapter(adapter)
    groups = record.lora_groups()
    if not groups:
        raise ConfigError(f"{record.label} holds no LoRA to resize (methods: {', '.join(record.other_methods)})")
    largest = max(g.rank for g in groups)
    if rank is not None and rank > largest:
        raise ConfigError(f"{record.label} has rank {largest}; resize_lora lowers ranks, got rank={rank}")
    result = AdapterResult(config=dict(record.config), tensors=dict(record.tensors))
    methods = [dict(m) for m in record.config["methods"]]
    for group in groups:
        new_rank = _resize_group(group, rank, energy, result)
        options = {**group.options, "r": new_rank, "alpha": group.scale * new_rank}
        methods[group.index] = method_entry(LORA, options)
        if any(result.layers[name].rank < new_rank for name in group.updates):
            result.notes.append(
                f"lora{_on(group)} is stored at rank {new_rank}; updates kept at lower ranks are zero-padded"
            )
    result.config["methods"] = methods
    if output is not None:
        result.save(output)
    return result


def _on(group: LoRAGroup) -> str:
    return f" on the {group.tower} tower" if group.tower else ""


def _resize_group(group: LoRAGroup, rank: int | None, energy: float | None, result: AdapterResult) -> int:
    """Resizes one lora method's updates into ``result``; returns the rank it is stored at."""
    factors = {}
    for name, update in group.updates.items():
        product = update.product()
        cap = min(rank, update.rank) if rank is not None else update.rank  # a rank-r update has r directions
        up, down, singular = svd_factors(product, cap)
        keep = up.shape[1] if energy is None else energy_rank(singular, energy, cap)
        up, down = up[:, :keep], down[:keep]
        factors[name] = (up, down, update)
        result.layers[name] = LayerFit(keep, relative_error(product, up @ down))
    new_rank = max(result.layers[name].rank for name in group.updates)
    for name, (up, down, update) in factors.items():
        a, b = lora_shaped(up, down, *tails(update.a, update.b), new_rank)
        result.tensors[f"{name}.lora_A"] = a.to(update.a.dtype)
        result.tensors[f"{name}.lora_B"] = b.to(update.b.dtype)
    return new_rank


def energy_rank(singular: torch.Tensor, energy: float, cap: int) -> int:
    """sd-scripts' rank for ``sv_fro`` with ``dynamic_param = sqrt(energy)`` (``index_sv_fro`` + 1, capped)."""
    if singular[0] <= MIN_SINGULAR_VALUE:
        return 1
    squares = singular.double().pow(2)
    kept = torch.cumsum(squares, dim=0) / squares.sum()
    needed = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype))) + 1
    needed = max(1, min(needed, singular.shape[0] - 1))
    return min(needed + 1, cap)
