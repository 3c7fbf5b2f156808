"""Exporters: write an adapted model in the file formats of PEFT and diffusers, loadable by those libraries as is.

Methods say which formats can hold them (``Method.export_formats``) and hand over their part
(``Method.export_parts``): low-rank updates ``(A, B)`` by module path, whole files, "the heads", or the tensors of
another adapter type in the format's own layout with that type's config (PEFT's LoHa, LoKr, OFT, BOFT: tensor keys and
``adapter_config.json`` fields). This module only combines the parts into each library's layout. Both LoRA formats
name tensors by module path and scale each update by ``lora_alpha / r`` of the module; the parts fold visionpeft's
scale into ``lora_B`` and the files say ``lora_alpha = r`` (scale 1), so a file means the same thing whatever
defaults the loader assumes.

The kohya file holds LoRA layers as kohya / A1111 LoRA (LoCon on convolutions) and the other methods' LyCORIS modules
(LoHa ``hada_*``, LoKr ``lokr_*``, OFT ``oft_blocks``, each with ``.alpha``; :mod:`visionpeft.checkpoint.lycoris`),
read by lycoris-lora (``lycoris/kohya.py`` ``create_network_from_weights``; ``lycoris/modules/loha.py``, ``lokr.py``,
``locon.py``, ``diag_oft.py``), A1111 (``extensions-builtin/Lora/network_hada.py``, ``network_lokr.py``,
``network_lora.py``, ``network_oft.py``) and ComfyUI (``comfy/weight_adapter/loha.py``, ``lokr.py``, ``lora.py``,
``oft.py``; names mapped in ``comfy/lora.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapter import AdapterState, require_state, unwrap
from ..errors import CheckpointError
from ..io import atomic_write
from ..methods import METHODS, ExportParts
from ..methods.base import BUNDLE_PREFIX
from .flux_kohya import flux_kohya_state_dict
from .lycoris import kohya_metadata, lycoris_state_dict

FORMATS = ("peft", "diffusers", "kohya")
#: The one file ``save_adapter(..., format="kohya")`` writes (A1111 / ComfyUI / sd-scripts read it as it is).
KOHYA_NAME = "lora_kohya.safetensors"


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata or {"format": "pt"}))


def collect_parts(state: AdapterState, format: str) -> ExportParts:
    """Combines the attached methods' parts of ``format``.

    Raises:
        CheckpointError: A method the format cannot hold, a method refusing, or nothing to export.
    """
    blocked = [m.name for m in state.methods if format not in m.export_formats]
    if blocked:
        holders = ", ".join(n for n in METHODS.names() if format in METHODS.get(n).export_formats)
        raise CheckpointError(
            f"the {format} format holds {holders} only; {', '.join(blocked)} cannot be exported "
            "(save with format='visionpeft')"
        )
    combined = ExportParts()
    for method in state.methods:
        part = method.export_parts(format)
        combined.lora_layers.update(part.lora_layers)
        combined.magnitudes.update(part.magnitudes)
        for filename, tensors in part.files.items():
            if filename in combined.files:
                raise CheckpointError(f"two attached methods both write {filename}; export them one at a time")
            combined.files[filename] = tensors
        combined.head = combined.head or part.head
        for folder, build in part.models.items():
            if folder in combined.models:
                raise CheckpointError(f"two attached methods both write {folder}/; export them one at a time")
            combined.models[folder] = build
        if part.adapter_config and combined.adapter_config:
            raise CheckpointError(
                f"the {format} format holds one adapter config, and two attached methods write one; "
                "save with format='visionpeft'"
            )
        combined.adapter_tensors.update(part.adapter_tensors)
        combined.bundled.update(part.bundled)
        combined.adapter_config = part.adapter_config or combined.adapter_config
    if combined.adapter_config and combined.lora_layers:
        raise CheckpointError(
            f"the {format} format holds one adapter type, and the attached methods write LoRA layers and "
            f"{combined.adapter_config.get('peft_type', 'other')} layers; save with format='visionpeft'"
        )
    if not combined.contributes:
        raise CheckpointError(f"nothing to export in the {format} format")
    if combined.magnitudes and len(combined.magnitudes) != len(combined.lora_layers):
        plain = sorted(set(combined.lora_layers) - set(combined.magnitudes))
        raise CheckpointError(
            f"the {format} format has one use_dora switch for all LoRA layers, but {plain[0]} is plain LoRA and "
            "others DoRA; save with format='visionpeft'"
        )
    return combined


def _peft_heads(state: AdapterState) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The task heads as PEFT's ``modules_to_save``: their module paths and their tensors under PEFT's keys."""
    modules_to_save, tensors = [], {}
    heads = state.backbone.heads()
    for name, path in state.backbone.head_paths().items():
        modules_to_save.append(path)
        for key, tensor in heads[name].state_dict(keep_vars=True).items():
            tensors[f"base_model.model.{path}.{key}"] = tensor
    return modules_to_save, tensors


def _write_peft_folder(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    _write_safetensors(tensors, directory / "adapter_model.safetensors")
    atomic_write(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return directory


def export_peft(model: nn.Module, directory: Path) -> Path:
    """Writes ``adapter_model.safetensors`` + ``adapter_config.json`` for ``peft.PeftModel.from_pretrained``: the
    LoRA layers (or the layers of another adapter type with the config its method gives), and the task heads as
    ``modules_to_save``."""
    state = require_state(model)
    parts = collect_parts(state, "peft")
    if parts.adapter_config:
        modules_to_save, head_tensors = _peft_heads(state)
        tensors = {f"base_model.model.{key}": tensor for key, tensor in parts.adapter_tensors.items()}
        config = {
            **parts.adapter_config,
            "task_type": None,
            "modules_to_save": modules_to_save or None,
            "inference_mode": True,
            "base_model_name_or_path": None,
        }
        return _write_peft_folder(directory, {**tensors, **head_tensors}, config)
    layers = parts.lora_layers
    tensors: dict[str, torch.Tensor] = {}
    ranks = {}
    for path, (a, b) in layers.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
        if path in parts.magnitudes:
            tensors[f"base_model.model.{path}.lora_magnitude_vector"] = parts.magnitudes[path]
        ranks[path] = a.shape[0]
    modules_to_save, head_tensors = _peft_heads(state)
    tensors.update(head_tensors)
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
        "use_dora": bool(parts.magnitudes),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    return _write_peft_folder(directory, tensors, config)


def export_diffusers(model: nn.Module, directory: Path) -> Path:
    """Writes what a Stable Diffusion pipeline loads with its own loaders: ``pytorch_lora_weights.safetensors``
    (U-Net and text-encoder LoRA; SDXL's second text encoder too, through
    ``StableDiffusionXLPipeline.save_lora_weights``; a Flux / SD3 transformer's through ``FluxPipeline`` /
    ``StableDiffusion3Pipeline.save_lora_weights(transformer_lora_layers=...)``) for ``pipeline.load_lora_weights``,
    the methods' own files (textual inversion's ``learned_embeds.safetensors`` for
    ``pipeline.load_textual_inversion``) and model folders (``controlnet/`` for ``ControlNetModel.from_pretrained``)."""
    state = require_state(model)
    parts = collect_parts(state, "diffusers")
    groups: dict[str, dict[str, torch.Tensor]] = {}  # component (unet, transformer, text_encoder...) -> tensors
    for path, (a, b) in parts.lora_layers.items():
        group, _, local = path.partition(".")
        groups.setdefault(group, {})[f"{local}.lora_A.weight"] = a.to("cpu").contiguous()
        groups[group][f"{local}.lora_B.weight"] = b.to("cpu").contiguous()
        if path in parts.magnitudes:
            groups[group][f"{local}.lora_magnitude_vector"] = parts.magnitudes[path].to("cpu").contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    if parts.lora_layers:
        import diffusers

        # the pipeline class whose loader reads this model's layout (SDXL's also names text_encoder_2)
        writer = getattr(diffusers, getattr(state.backbone, "lora_pipeline_class", "StableDiffusionPipeline"))
        layers = {f"{group}_lora_layers": tensors for group, tensors in groups.items() if tensors}
        writer.save_lora_weights(directory, **layers, safe_serialization=True)
    for filename, tensors in parts.files.items():
        _write_safetensors(tensors, directory / filename)
    for folder, build in parts.models.items():
        build().save_pretrained(directory / folder, safe_serialization=True)
    return directory


def kohya_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The U-Net / text-encoder adapter of ``model`` in the kohya / A1111 layout: LoRA layers
    (``lora_unet_<path>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``), converted by diffusers'
    ``convert_state_dict_to_kohya``, and the LyCORIS modules of other methods (LoHa ``.hada_w1_a``, LoKr
    ``.lokr_w1``, ...; :func:`visionpeft.checkpoint.lycoris.lycoris_state_dict`).

    Two renames that converter does not do for Stable Diffusion 1.x / 2.x: the single text encoder is ``lora_te_``
    in sd-scripts and A1111 (SDXL's two stay ``lora_te1_`` / ``lora_te2_``), and its modules are named under
    ``text_model.`` as in transformers 4 (transformers 5's ``CLIPTextModel`` dropped that level; the kohya layout
    kept it; SDXL's ``CLIPTextModelWithProjection`` still has it).

    Raises:
        CheckpointError: A family with no kohya file diffusers loads (SD3: the backbone's ``kohya_refusal``),
            DoRA (diffusers' Stable Diffusion loader drops kohya ``dora_scale`` keys), or methods the
            kohya layout cannot hold (ControlNet, BOFT, PEFT's input-side OFT). Textual inversion's embeddings
            come bundled (``ExportParts.bundled``).
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    state = require_state(model)
    refusal = getattr(state.backbone, "kohya_refusal", None)
    if refusal is not None:
        raise CheckpointError(refusal)
    parts = collect_parts(state, "kohya")
    if parts.magnitudes:
        raise CheckpointError(
            "DoRA has no kohya file diffusers loads (its Stable Diffusion loader drops dora_scale keys); "
            "save with format='diffusers'"
        )
    lycoris_modules = {**lycoris_state_dict(parts.adapter_tensors), **parts.bundled}
    if getattr(state.backbone, "kohya_layout", None) == "flux":
        if lycoris_modules:
            raise CheckpointError("the kohya Flux layout holds LoRA only; save with format='visionpeft'")
        return flux_kohya_state_dict(parts.lora_layers, linear_shapes(model))
    if not parts.lora_layers:
        return lycoris_modules
    peft_layout: dict[str, torch.Tensor] = {}
    for path, (a, b) in parts.lora_layers.items():
        group, _, local = path.partition(".")
        if group.startswith("text_encoder") and not local.startswith("text_model."):
            local = "text_model." + local
        peft_layout[f"{group}.{local}.lora_A.weight"] = a
        peft_layout[f"{group}.{local}.lora_B.weight"] = b
    converted = convert_state_dict_to_kohya(peft_layout)
    text_encoders = getattr(state.backbone, "text_encoders", None)
    single = text_encoders is None or len(text_encoders()) == 1
    renamed = {
        (("lora_te_" + k[len("lora_te1_") :]) if single and k.startswith("lora_te1_") else k): v
        for k, v in converted.items()
    }
    # diffusers' converter writes alpha = rank as an integer tensor; the parts fold the scale into B (scale 1)
    lora_modules = {k: v.float() if k.endswith(".alpha") else v for k, v in renamed.items()}
    return {**lora_modules, **lycoris_modules}


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear of the adapted model, by model-relative path (LoRA wrappers: their base layer's)."""
    from ..adapter import backbone_of

    shapes = {}
    for path, module in backbone_of(model).model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and weight is not None:
            shapes[path.removesuffix(".base")] = tuple(weight.shape)
    return shapes


def export_kohya(model: nn.Module, directory: Path) -> Path:
    """Writes one ``lora_kohya.safetensors`` in the kohya / A1111 layout (see :func:`kohya_state_dict`), with the
    ``ss_*`` metadata of a LyCORIS network when it holds LyCORIS modules
    (:func:`visionpeft.checkpoint.lycoris.kohya_metadata`) and textual inversion's embeddings bundled under
    ``bundle_emb.`` keys (:data:`BUNDLE_PREFIX`)."""
    tensors = kohya_state_dict(model)
    directory.mkdir(parents=True, exist_ok=True)
    modules = {key: value for key, value in tensors.items() if not key.startswith(BUNDLE_PREFIX)}
    _write_safetensors(tensors, directory / KOHYA_NAME, kohya_metadata(modules))
    return directory


def export(model: Any, directory: Path, format: str) -> Path:
    """Writes ``model``'s adapter to ``directory`` in ``format`` (``peft``, ``diffusers`` or ``kohya``)."""
    target = unwrap(model)
    if format == "peft":
        return export_peft(target, directory)
    if format == "diffusers":
        return export_diffusers(target, directory)
    if format == "kohya":
        return export_kohya(target, directory)
    raise CheckpointError(f"unknown adapter format '{format}'; choose visionpeft, diffusers, peft or kohya")
