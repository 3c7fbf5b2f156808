"""Weighted combinations of LoRA adapters of one base, as PEFT's ``LoraModel.add_weighted_adapter`` makes them.

Each adapter's update is taken as its PEFT export holds it (A, and B with ``alpha / r`` folded in: PEFT's scaling 1),
so the result equals ``add_weighted_adapter`` on the adapters' PEFT folders (tested); for adapters of one ``alpha /
r`` this is also PEFT's result on the adapters loaded with their own ``lora_alpha``. The new adapter has scale 1
(``alpha = r``, as PEFT's). Per combination type (PEFT's names and options):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A and B combined separately, A with
  weights ``sign(w) sqrt(|w|)`` and B with ``sqrt(|w|)`` (one rank for all adapters; ``linear`` is the rough
  approximation PEFT warns about: cross terms ``B_j A_i`` appear).
- ``cat``: A rows ``w_i A_i`` and B columns ``B_i`` stacked: exactly ``sum_i w_i delta W_i`` at rank ``sum_i r_i``.
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the full updates
  ``delta W_i`` combined, then truncated by SVD to ``svd_rank`` (:mod:`.lowrank`; relative error per layer reported).

The combining functions are PEFT's own (``peft.utils.merge_utils``: ``task_arithmetic``, ``ties``, ``dare_linear``,
``dare_ties``, ``magnitude_prune``), imported when a combination runs, so they are PEFT's by construction.

Seeds: the DARE types draw random masks (``torch.bernoulli``, one per adapter tensor). With ``seed`` set they come
from torch's default generator seeded with it inside ``torch.random.fork_rng`` (the caller's RNG state is restored),
drawn update by update in the natural order of the canonical names (``blocks.2`` before ``blocks.10``), for each
update all adapters' A then all B (``*svd``: each adapter's delta W), as PEFT draws them module by module. So the same
adapters and seed give the same file whether they come from folders or models, and the masks are PEFT's when PEFT's
generator is seeded with ``seed`` where it starts drawing them (after it initialised the new adapter's layers, which
draws random numbers too) and its module order is that natural order (a timm ViT; tested). Where the module order
is another (diffusers' U-Net registers ``up_blocks`` before ``mid_block``) the masks differ from PEFT's but follow
the same law (each value kept with probability ``density``, scaled by ``1 / density``); every other step is PEFT's.

Where this differs from PEFT: a LoRA on some slices of a fused projection (Q and V of timm's ``qkv``) is combined
slice by slice, each slice a LoRA of its own (PEFT sees the export's one rank-``2r`` LoRA on ``qkv``: the same result
for ``linear`` and ``cat``, other pruning / truncation for the rest). ``svd`` needs ``svd_rank`` (PEFT takes the
largest input rank). DoRA adapters are refused: PEFT's combined adapter keeps the base-weight norms as its magnitude,
dropping the inputs' (combine the merged models instead: merge each, then :func:`~visionpeft.extract_lora`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import ConfigError, did_you_mean
from .lowrank import lora_shaped, pad_rank, relative_error, svd_factors, tails
from .records import (
    LORA,
    AdapterRecord,
    AdapterResult,
    LayerFit,
    LoRAGroup,
    check_output,
    check_same_base,
    method_entry,
    natural_key,
    read_adapter,
)

#: PEFT's combination types: name -> (the merge_utils function combining the tensors, what it combines).
COMBINATIONS = {
    "linear": ("task_arithmetic", "factors"),
    "ties": ("ties", "factors"),
    "dare_linear": ("dare_linear", "factors"),
    "dare_ties": ("dare_ties", "factors"),
    "magnitude_prune": ("magnitude_prune", "factors"),
    "cat": (None, "cat"),
    "svd": ("task_arithmetic", "svd"),
    "ties_svd": ("ties", "svd"),
    "dare_linear_svd": ("dare_linear", "svd"),
    "dare_ties_svd": ("dare_ties", "svd"),
    "magnitude_prune_svd": ("magnitude_prune", "svd"),
}
SIGN_METHODS = ("total", "frequency")


def combine_adapters(
    adapters: Sequence[Any],
    weights: Sequence[float],
    combination_type: str,
    output: str | os.PathLike | None = None,
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = 0,
    heads_from: int | None = None,
    check_base: bool = True,
) -> AdapterResult:
    """A weighted combination of LoRA adapters of one base model (PEFT's ``add_weighted_adapter``; see the module
    docstring for each type and where it differs).

    Args:
        adapters: visionpeft adapter folders (``vp.save_adapter``) or models carrying a loaded LoRA.
        weights: One weight per adapter (negative subtracts).
        combination_type: One of :data:`COMBINATIONS`. A single adapter is combined with ``linear`` (as PEFT).
        output: A new or empty folder to write the visionpeft folder to (else use ``result.save(folder)``).
        svd_rank: The rank of the ``*svd`` types' result (required for them).
        svd_clamp: Quantile clamp of the SVD factors (PEFT's), None for none.
        svd_full_matrices: ``torch.linalg.svd``'s option (PEFT's default True).
        density: Fraction of values kept by the pruning types (``ties``, ``dare_*``, ``magnitude_prune``), in (0, 1].
        majority_sign_method: ``total`` or ``frequency`` (``ties``, ``dare_ties``).
        seed: The DARE masks' seed (None: torch's global RNG as it stands, as PEFT).
        heads_from: Index of the adapter whose task heads the result keeps, when several carry heads (heads are
            not combined; PEFT refuses ``modules_to_save`` in several adapters).
        check_base: Refuse adapters recorded on different base weights.

    Returns:
        The new adapter (:class:`AdapterResult`: ``save(folder)``; ``layers`` holds the ``*svd`` truncation errors).

    Raises:
        ConfigError: A bad option (unknown type, ``svd`` without ``svd_rank``, no density, weights not one per
            adapter), LoRAs that cannot be combined (other ranks for ``linear``-like types, DoRA, other methods,
            layers chosen differently), an output folder that holds files.
        CheckpointError: Unreadable folders, adapters of different bases.
    """
    kind, mode = _check_options(adapters, weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method)
    if output is not None:
        check_output(output, list(adapters))
    records = [read_adapter(a, _label(a, i)) for i, a in enumerate(adapters)]
    check_same_base(records, check_base)
    if len(records) == 1:  # PEFT combines a single adapter linearly whatever the type
        kind, mode = "task_arithmetic", "factors"
    towers = _towers(records)
    ranks = {tower: _new_rank(mode, groups, svd_rank) for tower, groups in towers.items()}
    heads = _heads(records, heads_from)
    config = _config(records, towers, ranks, heads_from)  # every refusal comes before the work
    merge = _merge_function(kind, density, majority_sign_method)
    updates: dict[str, tuple[str | None, list]] = {}  # name -> (tower, [(weight, Update) of each adapter having it])
    for tower, groups in towers.items():
        for i, group in groups:
            for name, update in group.updates.items():
                updates.setdefault(name, (tower, []))[1].append((float(weights[i]), update))
    tensors, layers = {}, {}
    with _seeded(seed if kind is not None and "dare" in kind else None):
        for name in sorted(updates, key=natural_key):
            tower, members = updates[name]
            a, b, fit = _combine_update(mode, merge, members, ranks[tower], svd_clamp, svd_full_matrices)
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a, b
            if fit is not None:
                layers[name] = fit
    result = AdapterResult(config, {**tensors, **heads}, layers)
    if output is not None:
        result.save(output)
    return result


def _label(adapter: Any, index: int) -> str:
    return str(adapter) if isinstance(adapter, (str, os.PathLike)) else f"adapter {index} (a loaded model)"


def _check_options(adapters, weights, combination_type, svd_rank, svd_clamp, density, sign_method) -> tuple[str, str]:
    """(merge_utils function, mode) of a valid request; every option mistake is one :class:`ConfigError`."""
    if combination_type not in COMBINATIONS:
        raise ConfigError(
            f"unknown combination_type '{combination_type}'{did_you_mean(combination_type, COMBINATIONS)}; "
            f"choose one of {', '.join(COMBINATIONS)}"
        )
    if isinstance(adapters, (str, os.PathLike)) or not adapters:
        raise ConfigError("combine_adapters takes a list of adapters (folders or models)")
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {list(weights)}")
    kind, mode = COMBINATIONS[combination_type]
    if mode == "svd" and svd_rank is None:
        raise ConfigError(f"combination_type '{combination_type}' needs svd_rank, the rank of the combined adapter")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ConfigError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise ConfigError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp}")
    prunes = kind not in ("task_arithmetic", None)
    if prunes and (density is None or not 0 < density <= 1):
        raise ConfigError(
            f"combination_type '{combination_type}' needs density, the fraction of values kept, in (0, 1]; "
            f"got {density}"
        )
    if sign_method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got '{sign_method}'")
    return kind, mode


def _towers(records: list[AdapterRecord]) -> dict[str | None, list[tuple[int, LoRAGroup]]]:
    """The LoRA groups by tower: (adapter index, group) of every adapter with a LoRA there, checked combinable."""
    towers: dict[str | None, list[tuple[int, LoRAGroup]]] = {}
    for i, record in enumerate(records):
        if record.other_methods:
            raise ConfigError(
                f"{record.label} holds {', '.join(record.other_methods)}; combine_adapters combines LoRA adapters"
            )
        groups = record.lora_groups()
        if not groups:
            raise ConfigError(f"{record.label} holds no LoRA to combine")
        for group in groups:
            if group.dora:
                raise ConfigError(
                    f"{record.label} is a DoRA adapter: its magnitudes rescale whole rows, so no combination of "
                    "factors combines the updates (PEFT keeps the base norms); merge each into a copy of the model "
                    "and extract_lora the difference instead"
                )
            towers.setdefault(group.tower, []).append((i, group))
    return towers


def _new_rank(mode: str, groups: list[tuple[int, LoRAGroup]], svd_rank: int | None) -> int:
    """The combined adapter's rank on one tower (PEFT's rule)."""
    if mode == "cat":
        return sum(g.rank for _, g in groups)
    if mode == "svd":
        return svd_rank
    ranks = sorted({g.rank for _, g in groups})
    if len(ranks) > 1:
        raise ConfigError(
            f"these combination types combine A and B factor by factor, which needs one rank; the adapters have "
            f"ranks {', '.join(map(str, ranks))}: use cat or an *svd type"
        )
    return ranks[0]


def _merge_function(kind: str | None, density: float | None, sign_method: str):
    """``f(tensors, weights)`` applying PEFT's merge_utils function ``kind`` (None for ``cat``)."""
    if kind is None:
        return None
    try:
        from peft.utils import merge_utils
    except ImportError:
        raise ConfigError("combine_adapters uses PEFT's merge functions: pip install peft") from None
    function = getattr(merge_utils, kind)
    if kind in ("ties", "dare_ties"):
        return lambda tensors, weights: function(tensors, weights, density, sign_method)
    if kind == "task_arithmetic":
        return function
    return lambda tensors, weights: function(tensors, weights, density)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """torch's default generator seeded with ``seed`` inside, the caller's state restored after (None: as it is)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _combine_update(mode, merge, members, rank, clamp, full_matrices):
    """``(A, B, fit)`` of one update from ``(weight, Update)`` of the adapters that have it (scale 1)."""
    dtype = members[0][1].a.dtype
    if mode == "cat":
        a = torch.cat([u.a * w for w, u in members])
        b = torch.cat([u.folded_b() for _, u in members], dim=1)
        return (*pad_rank(a, b, rank), None)
    if mode == "factors":
        weights_a = torch.tensor([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w, _ in members])
        weights_b = torch.tensor([math.sqrt(abs(w)) for w, _ in members])
        a = merge([u.a for _, u in members], weights_a).to(dtype)
        b = merge([u.folded_b() for _, u in members], weights_b).to(dtype)
        return a, b, None
    like = members[0][1]
    deltas = [u.folded_b().flatten(1) @ u.a.flatten(1) for _, u in members]
    delta = merge(deltas, torch.tensor([w for w, _ in members]))
    up, down, _ = svd_factors(delta, rank, full_matrices=full_matrices, clamp=clamp)
    a, b = lora_shaped(up, down, *tails(like.a, like.b), rank)
    fit = LayerFit(up.shape[1], relative_error(delta, up @ down))
    return a.to(dtype), b.to(dtype), fit


def _heads(records: list[AdapterRecord], heads_from: int | None) -> dict[str, torch.Tensor]:
    """The task heads the result keeps: ``heads_from``'s, or the one adapter's that has any."""
    carriers = [i for i, r in enumerate(records) if r.rest()]
    if heads_from is not None:
        if not 0 <= heads_from < len(records):
            raise ConfigError(f"heads_from={heads_from} names no adapter (0 to {len(records) - 1})")
        return records[heads_from].rest()
    if len(carriers) > 1:
        first, second = (records[i] for i in carriers[:2])
        shown = ", ".join(sorted(first.rest())[:2])
        raise ConfigError(
            f"{first.label} and {second.label} both carry task heads ({shown}); heads are not combined: keep one "
            "adapter's with heads_from=INDEX (command line: --heads-from INDEX)"
        )
    return records[carriers[0]].rest() if carriers else {}


def _config(records, towers, ranks, heads_from) -> dict[str, Any]:
    """The combined adapter's visionpeft config: the first adapter's record, one lora per tower (the union of the
    layers the adapters adapt, rank per PEFT's rule, alpha = rank), the heads' adapter's backbone / task record."""
    carriers = [i for i, r in enumerate(records) if r.rest()]
    owner = records[heads_from if heads_from is not None else (carriers[0] if carriers else 0)]
    config = {k: v for k, v in records[0].config.items() if k != "task"}
    config["backbone"] = owner.config.get("backbone", config.get("backbone"))
    if "task" in owner.config:
        config["task"] = owner.config["task"]
    methods = []
    for tower, groups in towers.items():
        options = dict(groups[0][1].options)
        options.update(_layers(records, groups))
        options.update(r=ranks[tower], alpha=float(ranks[tower]))
        methods.append(method_entry(LORA, options))
    config["methods"] = methods
    return config


def _layers(records, groups: list[tuple[int, LoRAGroup]]) -> dict[str, Any]:
    """``targets`` / ``target_modules`` covering every adapter's layers on one tower (PEFT's union; one regex is
    ``(a)|(b)``); LoRAs chosen one way and the other are refused."""
    specs = [g.options.get("target_modules") for _, g in groups]
    if len({s is None for s in specs}) > 1:
        chosen = [records[i].label for i, g in groups if g.options.get("target_modules") is not None]
        raise ConfigError(
            f"{chosen[0]} chooses its layers by target_modules and another adapter by targets; combine LoRAs "
            "whose layers are chosen the same way"
        )
    if specs[0] is None:
        targets = [t for _, g in groups for t in g.options["targets"]]
        return {"targets": list(dict.fromkeys(targets))}
    if all(isinstance(s, str) for s in specs):
        unique = list(dict.fromkeys(specs))
        return {"target_modules": unique[0] if len(unique) == 1 else "|".join(f"({s})" for s in unique)}
    if any(isinstance(s, str) for s in specs):
        raise ConfigError("some adapters choose target_modules by a regex and others by a list; combine one kind")
    return {"target_modules": list(dict.fromkeys(t for s in specs for t in s))}
