"""Exporters: write a visionpeft LoRA in the formats of PEFT and diffusers, loadable by those libraries as is.

Both formats name tensors by module path and scale each update by ``lora_alpha / r`` of the module. The export
folds visionpeft's scale into ``lora_B`` and writes ``lora_alpha = r`` (scale 1), so the file means the same
thing whatever defaults the loader assumes. A LoRA on some slices of a fused projection (Q and V of timm's
``qkv``) is written exactly as one LoRA of rank ``slices x r`` on the whole projection: A stacks the slices'
A matrices and B is block-diagonal, zero on the rows of the slices without an update.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter import _require_state, _unwrap
from .errors import CheckpointError
from .layers.lora import LoRAConv2d, LoRALinear, LoRAMultiheadAttention
from .methods.base import named_base_parameters


def _module_paths(model: nn.Module) -> dict[int, str]:
    """id(library module) -> its path in the model as it was before wrapping."""
    paths: dict[int, str] = {}
    for name, owner, _ in named_base_parameters(model):
        paths.setdefault(id(owner), name.rpartition(".")[0])
    return paths


def lora_module_tensors(model: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Returns ``{module path: (A, B)}`` with the scale folded into B, and the names of methods not exported.

    Raises:
        CheckpointError: A LoRA on ``nn.MultiheadAttention``, which these formats cannot express.
    """
    state = _require_state(model)
    paths = _module_paths(model)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    skipped = []
    for method in state.methods:
        if method.name != "lora":
            skipped.append(method.name)
            continue
        for wrapper in method.wrappers():
            path = paths[id(wrapper.base)]
            if isinstance(wrapper, LoRAMultiheadAttention):
                raise CheckpointError(
                    f"{path}: a LoRA on nn.MultiheadAttention (open_clip) has no PEFT / diffusers file layout; "
                    "save it with format='visionpeft'"
                )
            if isinstance(wrapper, LoRAConv2d):
                u = wrapper.update
                layers[path] = (u.lora_A.detach(), u.lora_B.detach() * u.scale)
            elif isinstance(wrapper, LoRALinear):
                layers[path] = _stack_slices(wrapper)
    return layers, skipped


def _stack_slices(wrapper: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    updates = [(wrapper.slices[name], u) for name, u in wrapper.updates.items()]
    a = torch.cat([u.lora_A.detach() for _, u in updates])
    b = a.new_zeros(wrapper.base.out_features, a.shape[0])
    col = 0
    for (start, stop), u in updates:
        b[start:stop, col : col + u.r] = u.lora_B.detach() * u.scale
        col += u.r
    return a, b


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from .checkpoint import atomic_write

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata={"format": "pt"}))


def export_peft(model: nn.Module, directory: Path) -> Path:
    """Writes ``adapter_model.safetensors`` + ``adapter_config.json`` for ``peft.PeftModel.from_pretrained``."""
    from .checkpoint import atomic_write

    layers, skipped = lora_module_tensors(model)
    state = _require_state(model)
    head = state.backbone.head()
    blocked = [name for name in skipped if name != "linear"]
    if blocked:
        raise CheckpointError(f"the PEFT format holds LoRA (+ head) only; {', '.join(blocked)} cannot be exported")
    if not layers and head is None:
        raise CheckpointError("nothing to export: no LoRA is attached")
    tensors: dict[str, torch.Tensor] = {}
    ranks = {}
    for path, (a, b) in layers.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
        ranks[path] = a.shape[0]
    modules_to_save = []
    if head is not None:
        head_path = state.backbone.head_name()
        modules_to_save.append(head_path)
        for name, tensor in head.named_parameters():
            tensors[f"base_model.model.{head_path}.{name}"] = tensor
    base_rank = min(ranks.values()) if ranks else 8
    pattern = {path: r for path, r in ranks.items() if r != base_rank}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "r": base_rank,
        "lora_alpha": base_rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": 0.0,
        "target_modules": sorted(layers),
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    _write_safetensors(tensors, directory / "adapter_model.safetensors")
    atomic_write(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return directory


def export_diffusers(model: nn.Module, directory: Path) -> Path:
    """Writes what a Stable Diffusion pipeline loads with its own loaders.

    ``pytorch_lora_weights.safetensors`` (U-Net and text-encoder LoRA) for ``pipeline.load_lora_weights`` and
    ``learned_embeds.safetensors`` (textual inversion) for ``pipeline.load_textual_inversion``.
    """
    state = _require_state(model)
    family = state.backbone.family
    if family not in ("diffusers_unet", "diffusers_sd_pipeline"):
        raise CheckpointError(
            f"the diffusers LoRA format is for a Stable Diffusion U-Net or pipeline; this is {family}"
        )
    layers, skipped = lora_module_tensors(model)
    blocked = [name for name in skipped if name != "textual_inversion"]
    if blocked:
        raise CheckpointError(
            f"the diffusers formats hold LoRA and textual inversion; {', '.join(blocked)} cannot be exported"
        )
    groups: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for path, (a, b) in layers.items():
        group, local = ("unet", path) if family == "diffusers_unet" else path.split(".", 1)
        groups[group][f"{local}.lora_A.weight"] = a.to("cpu").contiguous()
        groups[group][f"{local}.lora_B.weight"] = b.to("cpu").contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    if layers:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            directory,
            unet_lora_layers=groups["unet"] or None,
            text_encoder_lora_layers=groups["text_encoder"] or None,
            safe_serialization=True,
        )
    for method in state.methods:
        if method.name == "textual_inversion":
            _write_safetensors(method.learned_embeds(), directory / "learned_embeds.safetensors")
    return directory


def export(model: Any, directory: Path, format: str) -> Path:
    target = _unwrap(model)
    if format == "peft":
        return export_peft(target, directory)
    if format == "diffusers":
        return export_diffusers(target, directory)
    raise CheckpointError(f"unknown adapter format '{format}'; choose visionpeft, diffusers or peft")
