"""LoRA files of other tools in, merged models out.

- :func:`import_lora`: a single-file Stable Diffusion LoRA (kohya / A1111 ``lora_unet_...`` / ``lora_te_...`` keys,
  or diffusers' own layout) becomes visionpeft LoRA layers on a pipeline or U-Net (a LyCORIS file: LoHa / LoKr /
  LoCon methods, :mod:`visionpeft.checkpoint.lycoris_import`). diffusers reads and renames the
  file (``lora_state_dict``, ``convert_unet_state_dict_to_peft``, ``convert_state_dict_to_peft``); this module only
  groups the result by module, folds each module's ``alpha / rank`` into B and pads ranks to one ``r``. The kohya
  *writer* is :func:`visionpeft.checkpoint.exporters.kohya_state_dict` (``save_adapter(..., format="kohya")``).
- :func:`export_merged`: the model's own state dict with every attached method merged in, one safetensors file that
  the library loads as weights (timm: ``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``).
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..adapter import attach, backbone_of, can_merge, merge, methods_of, unwrap
from ..errors import CheckpointError, IncompatibleMethodError
from ..io import atomic_write
from .lycoris import is_lycoris_file
from .lycoris_import import import_lycoris


def _read_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def _peft_layout(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The file as PEFT-named tensors (``unet.<module>.lora_A.weight``) and alphas by module path, through diffusers'
    own readers and converters."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"{path} is no Stable Diffusion LoRA diffusers can read: {err}") from None

    def to_peft(tensors: dict[str, Any]) -> dict[str, Any]:
        unet = {k: v for k, v in tensors.items() if k.startswith("unet.")}
        rest = {k: v for k, v in tensors.items() if not k.startswith("unet.")}
        # text-encoder keys come out of diffusers' kohya reader in its old layout (to_q_lora / lora_linear_layer)
        rest = convert_state_dict_to_peft(rest, original_type=StateDictType.DIFFUSERS_OLD) if rest else {}
        return {**convert_unet_state_dict_to_peft(unet), **rest}

    named_alphas = to_peft({k.removesuffix(".alpha"): v for k, v in (alphas or {}).items()})
    module_alphas = {k.split(".lora_A")[0].removesuffix(".alpha"): float(v) for k, v in named_alphas.items()}
    return to_peft(state), module_alphas


def import_lora(model: Any, file: str | os.PathLike) -> Any:
    """Loads a single-file Stable Diffusion LoRA (kohya / A1111 or diffusers layout) as visionpeft LoRA layers.

    Each component in the file (``unet``, ``text_encoder``) gets one ``lora`` on that tower, by module path, with
    ``r`` the file's largest rank (smaller updates padded with zeros, which changes nothing) and every module's
    ``alpha / rank`` folded into its B. The result equals what ``pipeline.load_lora_weights(file)`` gives. A file
    with LyCORIS modules (LoHa, LoKr, CP-factored LoCon: what diffusers refuses) is read by
    :func:`visionpeft.checkpoint.lycoris_import.import_lycoris` instead.

    Args:
        model: A Stable Diffusion pipeline or U-Net, with no LoRA on the components in the file yet.
        file: The ``.safetensors`` file.

    Raises:
        CheckpointError: Unreadable file, a DoRA file (diffusers drops its ``dora_scale``; so would this), or
            components this model does not have.
    """
    path = Path(file)
    keys = _read_keys(path)
    if is_lycoris_file(keys):
        return import_lycoris(model, path)
    if any(k.endswith("dora_scale") or "lora_magnitude_vector" in k for k in keys):
        raise CheckpointError(
            f"{path} is a DoRA file; import_lora reads plain LoRA (diffusers' loader drops kohya dora_scale keys)"
        )
    tensors, alphas = _peft_layout(path)
    backbone = backbone_of(model)
    by_component: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        module, _, kind = rest.rpartition(".lora_")
        by_component[component][module][kind.split(".")[0]] = tensor
    specs, locate = [], {}
    for component, modules in by_component.items():
        broken = next((m for m, parts in modules.items() if set(parts) != {"A", "B"}), None)
        if broken is not None:
            found = ", ".join(sorted(modules[broken]))
            raise CheckpointError(f"{path}: {component}.{broken} has LoRA parts {found}; import_lora reads A and B")
        where = backbone.diffusers_component(component)
        if where is None:
            raise CheckpointError(f"{path} holds a {component} LoRA; this {backbone.family} model has no {component}")
        tower, prefix = where
        root = unwrap(model)
        rank = max(parts["A"].shape[0] for parts in modules.values())
        paths = {}
        for module, parts in modules.items():
            full = prefix + _existing(root, prefix, module)
            paths[full] = (parts, alphas.get(f"{component}.{module}", float(parts["A"].shape[0])))
        specs.append(("lora", {"tower": tower, "r": rank, "alpha": float(rank), "target_modules": sorted(paths)}))
        locate.update(paths)
    before = methods_of(model)
    attach(model, specs)
    with torch.no_grad():
        for method in methods_of(model):
            if method in before:
                continue
            for name, tensor in method.named_tensors():
                module, _, kind = name.rpartition(".")
                parts, alpha = locate[module]
                _copy_padded(tensor, parts["A"] if kind == "lora_A" else parts["B"] * (alpha / parts["A"].shape[0]))
    return model


def _existing(root: torch.nn.Module, prefix: str, module: str) -> str:
    """The module path in this model: the kohya layout names the CLIP text encoder under ``text_model.`` as
    transformers 4 did; transformers 5 dropped that level."""
    for candidate in (module, module.removeprefix("text_model.")):
        try:
            root.get_submodule(prefix + candidate)
            return candidate
        except AttributeError:
            continue
    return module  # let target_modules name what exists


def _copy_padded(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copies a LoRA factor of rank <= the target's, zero-padding the rank dimension (A: rows, B: columns)."""
    target.zero_()
    if target.shape == source.shape:
        target.copy_(source)
    elif target.shape[0] != source.shape[0]:  # A: (r, ...)
        target[: source.shape[0]].copy_(source)
    else:  # B: (out, r, ...)
        target[:, : source.shape[1]].copy_(source)


def export_merged(model: Any, file: str | os.PathLike) -> Path:
    """Saves the model's own state dict with every attached method merged into the weights (on a copy: ``model``
    stays adapted), as one safetensors file the library loads as its weights, e.g. for timm
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=n))``.

    Raises:
        IncompatibleMethodError: A method that cannot be merged exactly (VPT, adapters), or a pipeline (save its
            merged U-Net with diffusers' ``save_pretrained`` instead).
    """
    if not isinstance(model, torch.nn.Module):
        raise IncompatibleMethodError("export_merged takes a torch model; for a pipeline merge and save_pretrained it")
    if not can_merge(model):
        names = ", ".join(m.name for m in methods_of(model) if not m.merges_exactly) or "no method is attached"
        raise IncompatibleMethodError(f"export_merged needs methods that merge exactly into the weights: {names}")
    merged = merge(copy.deepcopy(model))
    # clone: tied weights share storage, which safetensors refuses; the file then holds each name's own copy
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in merged.state_dict().items()}
    path = Path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return path
