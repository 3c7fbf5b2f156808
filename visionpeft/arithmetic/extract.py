"""A LoRA of a fully fine-tuned model's difference to its base (kohya-ss/sd-scripts
``networks/extract_lora_from_models.py``, read at commit 48d368f).

As sd-scripts' ``svd``: for each adapted layer the weight difference ``W_tuned - W_base`` (a conv's read as
``(out, in * kh * kw)``) is decomposed by SVD and its first ``rank`` triplets kept (``U_k diag(S_k)`` -> B,
``Vh_k`` -> A, ``rank = min(rank, out, in)``; convolutions with a kernel larger than 1x1 take ``conv_rank``), scale 1
(sd-scripts writes ``alpha = rank``). Differences from sd-scripts, said here: every Linear, Conv2d and
``nn.MultiheadAttention`` (its q, k, v and output projections) of every tower is a candidate (sd-scripts: the
attention / MLP Linears and 1x1 convs of the U-Net and text encoder, 3x3 convs only with ``--conv_dim``), narrowed by
``target_modules`` (PEFT's rule); a layer whose largest absolute difference is at most ``min_diff`` is left out
(sd-scripts' ``min_diff`` decides for the whole text encoder); the factors are not clamped unless
``clamp_quantile`` is given (sd-scripts clamps at 0.99 by default, which adds error). Task heads that differ
are taken whole (they train in full with every visionpeft method); other differing tensors (biases, norms,
embeddings) cannot be a LoRA and are listed in the result's notes.

visionpeft's ``lora`` has one rank per tower, so updates of lower rank (a narrow layer, ``conv_rank``) are zero-padded
to the tower's largest (exact). The LoRA is attached to ``base`` (one ``lora`` per tower, ``target_modules`` = the
layers' paths), so ``vp.save_adapter`` writes it in any format that holds it; the relative error per layer is
``||D - B A||_F / ||D||_F``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import attach, backbone_of, detach, methods_of, unwrap
from ..backbones.module_paths import TargetSpec, library_modules, matches_target
from ..checkpoint import save_adapter
from ..checkpoint.exporters import FORMATS
from ..checkpoint.folder import adapter_record
from ..errors import ConfigError
from .lowrank import lora_shaped, relative_error, svd_factors
from .records import FACTOR_A, LORA, AdapterResult, LayerFit, backbone_summary, check_output, natural_key

#: Library modules a LoRA can be extracted for (as visionpeft's lora adapts them).
EXTRACTABLE = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)
MHA_SLOTS = "qkvo"


@dataclass
class _Difference:
    """One update to extract: its tower, library module path, canonical name and weight difference."""

    tower: str
    path: str
    name: str
    matrix: torch.Tensor  # (out, in * kh * kw), float32
    a_tail: tuple  # A's shape past the rank dimension: (in,) or (in, kh, kw)
    b_tail: tuple  # B's past (out, rank): () or (1, 1)
    kernel: bool  # a convolution with a kernel larger than 1x1


def extract_lora(
    tuned: Any,
    base: Any,
    rank: int,
    output: str | os.PathLike | None = None,
    format: str = "visionpeft",
    *,
    conv_rank: int | None = None,
    target_modules: TargetSpec | None = None,
    clamp_quantile: float | None = None,
    min_diff: float = 0.0,
) -> AdapterResult:
    """Extracts a LoRA of rank ``rank`` from ``tuned`` (a fine-tuned copy of ``base``) and attaches it to ``base``.

    Args:
        tuned: The fine-tuned model (or pipeline), the same architecture as ``base``.
        base: The model it was fine-tuned from, with no visionpeft method attached; it carries the extracted LoRA
            afterwards (``vp.detach(base)`` restores it exactly), its task heads set to the tuned ones.
        rank: The LoRA rank of Linear layers and 1x1 convolutions.
        output: A new or empty folder to save the adapter to, in ``format``.
        format: ``visionpeft``, ``peft``, ``diffusers`` or ``kohya`` (as ``vp.save_adapter``).
        conv_rank: The rank of convolutions with a larger kernel (default ``rank``).
        target_modules: Only these layers (module-path suffixes or one regex, PEFT's rule).
        clamp_quantile: Clamp the factors at this quantile of their values (sd-scripts' 0.99); None: no clamp.
        min_diff: Leave out layers whose largest absolute difference is at most this.

    Returns:
        The adapter (:class:`AdapterResult`: ``layers`` the rank and relative error per update, ``notes`` the
        differing tensors no LoRA holds).

    Raises:
        ConfigError: Bad options, a base carrying methods, models of different architectures, no layer differing.
        CheckpointError: A format that cannot hold the LoRA (nothing is written, ``base`` is left as it was).
    """
    _check_options(rank, conv_rank, clamp_quantile, min_diff, format)
    if output is not None:
        check_output(output, [])
    if getattr(unwrap(base), "_visionpeft_state", None) is not None:
        raise ConfigError("base carries visionpeft methods; extract_lora needs the plain base model (vp.detach it)")
    backbone = backbone_of(base)
    theirs, ours = backbone_of(tuned).describe(), backbone.describe()
    if theirs != ours:
        raise ConfigError(
            f"tuned and base are different architectures ({backbone_summary(theirs)} vs {backbone_summary(ours)}); "
            "extract_lora takes a fine-tuned model and the model it was fine-tuned from"
        )
    differences, notes = _differences(unwrap(tuned), backbone, target_modules, min_diff)
    factors = {}
    for diff in differences:
        wanted = conv_rank if diff.kernel and conv_rank is not None else rank
        up, down, _ = svd_factors(diff.matrix, min(wanted, *diff.matrix.shape), clamp=clamp_quantile)
        factors[diff.name] = (diff, up, down)
    ranks: dict[str, int] = defaultdict(int)
    paths: dict[str, list[str]] = defaultdict(list)
    for diff, up, _ in factors.values():
        ranks[diff.tower] = max(ranks[diff.tower], up.shape[1])
        if diff.path not in paths[diff.tower]:
            paths[diff.tower].append(diff.path)
    specs = [(LORA, {"tower": t, "r": ranks[t], "alpha": float(ranks[t]), "target_modules": paths[t]}) for t in paths]
    attach(base, specs)
    created = output is not None and not Path(output).exists()
    try:
        result = _fill(base, tuned, factors, notes)
        if output is not None:
            if format == "visionpeft":
                result.save(output)
            else:
                result.output = save_adapter(base, output, format=format)
    except BaseException:
        detach(base)
        if created and Path(output).is_dir() and not any(Path(output).iterdir()):
            Path(output).rmdir()
        raise
    return result


def _check_options(rank, conv_rank, clamp_quantile, min_diff, format) -> None:
    for option, value in (("rank", rank), ("conv_rank", conv_rank)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{option} must be a positive integer, got {value!r}")
    if rank is None:
        raise ConfigError("extract_lora needs rank, the rank of the extracted LoRA")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise ConfigError(f"clamp_quantile is a quantile in (0, 1], got {clamp_quantile}")
    if not min_diff >= 0:
        raise ConfigError(f"min_diff must be at least 0, got {min_diff}")
    if format not in ("visionpeft", *FORMATS):
        raise ConfigError(f"unknown format '{format}'; choose visionpeft, {', '.join(FORMATS)}")


def _candidates(backbone, target_modules: TargetSpec | None) -> list[tuple[str, str, nn.Module]]:
    """``(tower, path, module)`` of every Linear / Conv2d / MultiheadAttention a LoRA can adapt, heads excluded."""
    heads = {id(m) for head in backbone.heads().values() for m in head.modules()}
    found, inside = [], []
    for path, _, _, module in library_modules(backbone.model):
        if any(path.startswith(p + ".") for p in inside):  # a MultiheadAttention's out_proj: adapted through it
            continue
        if id(module) in heads or not isinstance(module, EXTRACTABLE):
            continue
        if isinstance(module, nn.MultiheadAttention):
            inside.append(path)
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        tower = next(
            (t.name for t in backbone.towers.values() for n, _ in module.named_parameters() if t.owns(f"{path}.{n}")),
            None,
        )
        if tower is not None and (target_modules is None or matches_target(path, target_modules)):
            found.append((tower, path, module))
    if not found:
        what = f"target_modules {target_modules!r} selects" if target_modules is not None else "the model has"
        raise ConfigError(f"{what} no Linear, Conv2d or MultiheadAttention layer to extract a LoRA for")
    return found


def _slots(path: str, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(canonical name, weight)`` of the updates visionpeft's lora puts on ``module`` (an MHA: one per slot)."""
    if not isinstance(module, nn.MultiheadAttention):
        return [(path, module.weight)]
    d = module.embed_dim
    rows = {s: module.in_proj_weight[i * d : (i + 1) * d] for i, s in enumerate("qkv")}
    return [(f"{path}.{s}", rows[s] if s != "o" else module.out_proj.weight) for s in MHA_SLOTS]


def _differences(tuned_root: nn.Module, backbone, target_modules, min_diff) -> tuple[list[_Difference], list[str]]:
    """The updates to extract, and notes on what differs but is left out."""
    differences, covered = [], set()
    for tower, path, module in _candidates(backbone, target_modules):
        try:
            other = tuned_root.get_submodule(path)
        except AttributeError:
            raise ConfigError(
                f"the tuned model has no {path}; extract_lora needs two models of one architecture"
            ) from None
        if type(other) is not type(module):
            raise ConfigError(f"{path} is a {type(module).__name__} in base and a {type(other).__name__} in tuned")
        for (name, weight), (_, tuned_weight) in zip(_slots(path, module), _slots(path, other)):
            if tuned_weight.shape != weight.shape:
                raise ConfigError(
                    f"{name} has shape {tuple(tuned_weight.shape)} in tuned and {tuple(weight.shape)} in base; "
                    "extract_lora needs two models of one architecture"
                )
            difference = (tuned_weight.detach().float().cpu() - weight.detach().float().cpu()).flatten(1)
            conv = weight.dim() == 4
            kernel = conv and tuple(weight.shape[2:]) != (1, 1)
            b_tail = (1, 1) if conv else ()
            differences.append(_Difference(tower, path, name, difference, tuple(weight.shape[1:]), b_tail, kernel))
        covered.update(f"{path}.{n}" for n, p in module.named_parameters() if p.dim() > 1)
    largest = {d.path: 0.0 for d in differences}
    for d in differences:
        largest[d.path] = max(largest[d.path], float(d.matrix.abs().max()))
    keep = {path for path, value in largest.items() if value > min_diff}
    small = sorted(path for path, value in largest.items() if 0 < value <= min_diff)
    differences = [d for d in differences if d.path in keep]
    if not differences:
        raise ConfigError(
            f"no adapted layer differs between tuned and base by more than min_diff={min_diff}; nothing to extract"
        )
    notes = [f"left out (largest difference <= min_diff): {', '.join(small)}"] if small else []
    heads = {id(p) for head in backbone.heads().values() for p in head.parameters()}
    tuned_params = dict(tuned_root.named_parameters())
    others = []
    for name, parameter in backbone.model.named_parameters():
        if name in covered or id(parameter) in heads or name not in tuned_params:
            continue
        if tuned_params[name].shape == parameter.shape and not torch.equal(
            tuned_params[name].detach().cpu(), parameter.detach().cpu()
        ):
            others.append(name)
    if others:
        more = f" (+{len(others) - 5} more)" if len(others) > 5 else ""
        notes.append(f"differ but no LoRA holds them (kept from base): {', '.join(others[:5])}{more}")
    return differences, notes


def _fill(base: Any, tuned: Any, factors: dict, notes: list[str]) -> AdapterResult:
    """Copies the factors into the LoRA attached to ``base`` and the tuned heads into its heads."""
    layers = {}
    with torch.no_grad():
        for method in methods_of(base):
            tensors = dict(method.named_tensors())
            for key, tensor in tensors.items():
                prefix, _, kind = key.rpartition(".")
                if kind != FACTOR_A:
                    continue
                diff, up, down = factors[prefix]
                a, b = lora_shaped(up, down, diff.a_tail, diff.b_tail, tensor.shape[0])
                tensor.copy_(a.to(tensor.dtype))
                tensors[f"{prefix}.lora_B"].copy_(b.to(tensor.dtype))
                layers[prefix] = LayerFit(up.shape[1], relative_error(diff.matrix, up @ down))
        backbone = backbone_of(base)
        tuned_root = unwrap(tuned)
        for name, path in backbone.head_paths().items():
            head = backbone.heads()[name]
            try:
                head.load_state_dict(tuned_root.get_submodule(path).state_dict())
            except (AttributeError, RuntimeError) as err:
                raise ConfigError(f"the tuned model's head {path} does not fit the base's: {err}") from None
    tensors, config = adapter_record(base)
    return AdapterResult(config, tensors, layers={k: layers[k] for k in sorted(layers, key=natural_key)}, notes=notes)
