"""Hotswapping: another adapter's weights copied into the adapter a model carries, in place (PEFT's
``peft.utils.hotswap.hotswap_adapter``, diffusers' ``load_lora_weights(..., hotswap=True)`` after
``enable_lora_hotswap``).

Every tensor is copied into the existing parameter (``Tensor.copy_``): no module, parameter or Python attribute of the
model changes, so a ``torch.compile``-d model runs the new adapter without recompiling (tested with
``torch._dynamo``'s counters). As in PEFT:

- The new adapter's LoRA layers are the loaded one's or a subset (layers it lacks get zero factors).
- A lower rank is zero-padded into the loaded factors (exact); a higher rank is refused (the shapes would change:
  load the largest adapter first, or resize the others with :func:`~visionpeft.resize_lora`). diffusers'
  ``enable_lora_hotswap(target_rank=R)`` is ``vp.attach(model, "lora", r=R, ...)`` on the same layers before
  compiling (B starts at zero: the model is unchanged), then a swap per adapter.
- Another ``alpha / r``: PEFT keeps the scale as a tensor it overwrites (``prepare_model_for_compiled_hotswap``);
  here the new scale's ratio to the loaded one is folded into B (``B * s_new / s_old``), the same update, with the
  layers' scale left as it is. So a model saved after a swap holds that folded B with the loaded alpha.

Methods, towers and options other than ``r`` / ``alpha`` / ``dropout`` (which only acts in training) must match
the loaded adapter's; other methods' tensors and the task heads are copied as they are (same shapes). Everything is
checked before the first copy: a refused swap leaves the model as it was.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..adapter import attached_methods, backbone_of, methods_of, require_state, unwrap
from ..checkpoint.folder import adapter_state_dict, base_mismatch, non_finite
from ..errors import CheckpointError, ConfigError
from ..methods import make_config
from .records import FACTOR_A, FACTOR_B, LORA, read_adapter

#: LoRA options a swap may change (the rank within the loaded one, the scale, training-only dropout).
SWAPPABLE = ("r", "alpha", "dropout")


def hotswap_adapter(model: Any, adapter: str | os.PathLike | Any, check_base: bool = True) -> Any:
    """Replaces the weights of the adapter ``model`` carries by those of ``adapter``, in place.

    Args:
        model: A model (or pipeline) with a loaded adapter (``vp.load_adapter``), compiled or not.
        adapter: A visionpeft adapter folder of the same methods on the same layers (or a subset of the LoRA
            layers), or a model carrying one.
        check_base: Refuse an adapter recorded on other base weights than ``model``'s.

    Returns:
        ``model``.

    Raises:
        CheckpointError: Other methods, towers or options, layers the loaded adapter lacks, a higher rank, other
            shapes, NaN values, other base weights; nothing is copied then.
    """
    require_state(unwrap(model))  # a model without an adapter is one line
    record = read_adapter(adapter)
    label = record.label
    try:
        saved = [(m["name"], make_config(m["name"], m.get("config", {})).to_dict()) for m in record.config["methods"]]
    except ConfigError as err:
        raise CheckpointError(f"{label}: {err}") from None
    loaded = [(name, cfg.to_dict()) for name, cfg in attached_methods(model)]
    _check_methods(label, saved, loaded)
    family, saved_family = backbone_of(model).family, (record.config.get("backbone") or {}).get("family")
    if saved_family != family:
        raise CheckpointError(f"{label} holds an adapter for a {saved_family} backbone; this model is {family}")
    problem = non_finite(record.tensors)
    if problem is None and check_base and "base_model" in record.config:
        problem = base_mismatch(model, record.config["base_model"])
    if problem:
        raise CheckpointError(f"{label} {problem}")
    current = adapter_state_dict(model)
    unexpected = sorted(set(record.tensors) - set(current))
    if unexpected:
        raise CheckpointError(
            f"{label} has tensors the loaded adapter lacks ({', '.join(unexpected[:3])}); hotswap replaces the "
            "weights of the same layers: load it with vp.load_adapter instead"
        )
    plan = _lora_plan(label, model, record)
    for name, target in current.items():
        if name in plan:
            continue
        if name not in record.tensors:
            raise CheckpointError(f"{label} has no {name}, which the loaded adapter has")
        if record.tensors[name].shape != target.shape:
            raise CheckpointError(
                f"{label}: {name} has shape {tuple(record.tensors[name].shape)}, the loaded one {tuple(target.shape)}"
            )
        plan[name] = record.tensors[name]
    with torch.no_grad():
        for name, value in plan.items():
            current[name].copy_(value.to(device=current[name].device, dtype=current[name].dtype))
    return model


def _check_methods(label: str, saved: list, loaded: list) -> None:
    """The saved methods are the loaded ones, with the same options but those a swap may change."""
    if [name for name, _ in saved] != [name for name, _ in loaded]:
        raise CheckpointError(
            f"{label} holds {', '.join(n for n, _ in saved) or 'no method'}; the model carries "
            f"{', '.join(n for n, _ in loaded) or 'no method'}: hotswap needs the same methods (vp.load_adapter "
            "loads another kind)"
        )
    for (name, options), (_, ours) in zip(saved, loaded):
        free = SWAPPABLE if name == LORA else ()
        if name == LORA and options.get("target_modules") is not None:
            free += ("target_modules",)  # a subset of the layers is checked by name
        differ = sorted(k for k in set(options) | set(ours) if k not in free and options.get(k) != ours.get(k))
        if differ:
            key = differ[0]
            raise CheckpointError(
                f"{label}: {name} has {key}={options.get(key)!r}, the loaded adapter {key}={ours.get(key)!r}; "
                "hotswap keeps the model's structure, so only the weights (rank up to the loaded one, alpha) may "
                "differ"
            )


def _lora_plan(label: str, model: Any, record) -> dict[str, torch.Tensor]:
    """The values to copy into the loaded LoRA factors: the new ones zero-padded to the loaded rank with their scale
    folded relative to the loaded scale; zeros for layers the new adapter lacks."""
    plan: dict[str, torch.Tensor] = {}
    groups = iter(record.lora_groups())
    for method in methods_of(model):
        if method.name != LORA:
            continue
        group = next(groups)
        loaded_scale = method.config.alpha / method.config.r
        tensors = dict(method.named_tensors())
        for key, target in tensors.items():
            prefix, _, kind = key.rpartition(".")
            if kind != FACTOR_A:
                continue
            b_key = f"{prefix}.{FACTOR_B}"
            update = group.updates.get(prefix)
            if update is None:
                if method.config.use_dora:
                    raise CheckpointError(f"{label} has no {prefix}; a DoRA layer cannot be switched off by zeros")
                plan[key], plan[b_key] = torch.zeros_like(target), torch.zeros_like(tensors[b_key])
                continue
            if update.a.shape[1:] != target.shape[1:] or update.b.shape[0] != tensors[b_key].shape[0]:
                raise CheckpointError(
                    f"{label}: {prefix} has factors {tuple(update.a.shape)} / {tuple(update.b.shape)}, the loaded "
                    f"adapter {tuple(target.shape)} / {tuple(tensors[b_key].shape)}"
                )
            if update.rank > target.shape[0]:
                raise CheckpointError(
                    f"{label} has rank {update.rank} at {prefix}, the loaded adapter {target.shape[0]}: hotswap pads "
                    "lower ranks only; load the adapter of the largest rank first (or resize_lora the others)"
                )
            a = torch.zeros_like(target, device="cpu", dtype=update.a.dtype)
            b = torch.zeros_like(tensors[b_key], device="cpu", dtype=update.b.dtype)
            a[: update.rank] = update.a
            b[:, : update.rank] = update.b * (update.scale / loaded_scale)
            plan[key], plan[b_key] = a, b
    return plan
