"""Adapter-only checkpoints: ``visionpeft_adapter.safetensors`` (canonical keys, only trained tensors) and
``visionpeft_config.json`` (the methods' configs, the backbone's identity, the base weights it was trained on,
library versions and, for a task model with a ``task_metadata()``, its record under ``task``).

The names differ from PEFT's on purpose: a folder holding ``adapter_config.json`` is read by
``peft.PeftModel.from_pretrained``, so that name is kept for a file PEFT really loads. Whenever the adapter is
representable in PEFT (LoRA layers, plus task heads as ``modules_to_save``) the default folder also holds
PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``; folders written before this change (visionpeft's
schema under PEFT's names) still load.

``save_adapter(..., format="diffusers" | "peft" | "kohya")`` writes only the files those libraries (or A1111 /
ComfyUI) load as they are (see :mod:`visionpeft.checkpoint.exporters`); ``load_adapter`` on a single
``.safetensors`` LoRA file imports it (:func:`visionpeft.checkpoint.conversions.import_lora`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..adapter import (
    apply_requires_grad,
    attach,
    attached_methods,
    backbone_of,
    can_export,
    count_parameters,
    detach,
    methods_of,
    require_state,
    unwrap,
)
from ..errors import CheckpointError, ConfigError, VisionPEFTError
from ..io import atomic_write
from ..methods import make_config
from ..methods.base import named_persistent_buffers
from ..version import __version__
from .base_weights import describe_base, frozen_dtype, frozen_weights_sha256, weights_source
from .exporters import KOHYA_NAME, collect_parts, export
from .hub_io import build_model_card, download_adapter, library_name, looks_like_repo_id, push_folder

WEIGHTS_NAME = "visionpeft_adapter.safetensors"
CONFIG_NAME = "visionpeft_config.json"
#: Names visionpeft used before it stopped sharing PEFT's file names (read, never written).
LEGACY_NAMES = ("adapter_model.safetensors", "adapter_config.json")
FORMAT_VERSION = 1
logger = logging.getLogger(__name__)
METHOD_ENTRY = '{"name": ..., "config": {...}}'  # one element of the config's "methods" list


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose module layout a checkpoint depends on."""
    import importlib.metadata as md

    versions = {"visionpeft": __version__, "torch": torch.__version__}
    for dist in ("timm", "open_clip_torch", "diffusers", "transformers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def head_state(model: Any) -> dict[str, torch.Tensor]:
    """The task heads' parameters and persistent buffers under canonical names (``head.weight``,
    ``head.bn.running_mean``)."""
    tensors: dict[str, torch.Tensor] = {}
    for head_name, head in require_state(unwrap(model)).backbone.heads().items():
        for name, tensor in head.named_parameters():
            tensors[f"{head_name}.{name}"] = tensor
        for name, owner, attr in named_persistent_buffers(head):
            tensors[f"{head_name}.{name}"] = owner._buffers[attr]
    return tensors


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Every trained tensor of an adapted model under its canonical name: the methods' parameters and buffers, then
    the heads'."""
    state = require_state(unwrap(model))
    tensors: dict[str, torch.Tensor] = {}
    for method in state.methods:
        for name, tensor in method.named_state():
            tensors[name] = tensor
    tensors.update(head_state(model))
    return tensors


def save_adapter(
    model: Any, directory: str | os.PathLike, format: str = "visionpeft", push_to_hub: str | None = None
) -> Path:
    """Saves only what was trained.

    Args:
        model: An adapted model.
        directory: Output folder (created if needed).
        format: ``visionpeft`` (canonical keys, reloadable with :func:`load_adapter`; when the adapter is
            representable in PEFT the folder also holds PEFT's files), ``diffusers`` (a LoRA that
            ``pipeline.load_lora_weights`` loads), or ``peft`` (``adapter_model.safetensors`` + ``adapter_config.json``
            that ``peft.PeftModel.from_pretrained`` loads), or ``kohya`` (one ``lora_kohya.safetensors`` with
            ``lora_unet_...`` / ``lora_te_...`` keys for A1111 / ComfyUI / ``load_lora_weights``; LoHa, LoKr and
            output-side OFT as LyCORIS modules, which lycoris-lora, A1111 and ComfyUI read).
        push_to_hub: A hub model repo (``user/name``) to upload the folder to, with a model card
            (``README.md``) when the folder has none.

    Returns:
        The folder written.
    """
    directory = Path(directory)
    if format != "visionpeft":
        export(model, directory, format)
    else:
        _save_visionpeft(model, directory)
    if push_to_hub:
        if not (directory / "README.md").is_file():
            write_model_card(model, directory)
        push_folder(directory, push_to_hub, ignore=())
    return directory


def write_model_card(model: Any, directory: Path, **details: Any) -> Path:
    """Writes ``directory/README.md`` describing the adapter of ``model`` (``details``: the keyword arguments of
    :func:`visionpeft.checkpoint.hub_io.build_model_card`, e.g. metrics, data, command, images)."""
    library = library_name(directory)
    source = weights_source(model)
    options = {
        "title": f"{' + '.join(name for name, _ in attached_methods(model))} adapter",
        "base_model": source,
        "methods": [(name, cfg.to_dict()) for name, cfg in attached_methods(model)],
        "parameters": count_parameters(model),
        "library": library,
        "how_to_load": LOADING[library].format(base=source or "BASE", weight=_weight_name(directory)),
        **details,
    }
    card = build_model_card(**options)
    atomic_write(directory / "README.md", lambda tmp: Path(tmp).write_text(str(card)))
    return directory / "README.md"


LOADING = {
    "visionpeft": "import visionpeft as vp\n\nmodel = ...  # the base model: {base}\nvp.load_adapter(model, FOLDER)",
    "peft": "from peft import PeftModel\n\nmodel = PeftModel.from_pretrained(base_model, FOLDER)  # base: {base}",
    "diffusers": 'from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("{base}")\n'
    "pipe.load_lora_weights(FOLDER{weight})",
}


def _weight_name(directory: Path) -> str:
    """The ``weight_name`` argument diffusers needs for a LoRA file of another name than its own."""
    return f', weight_name="{KOHYA_NAME}"' if (directory / KOHYA_NAME).is_file() else ""


def adapter_record(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What a visionpeft folder of ``model``'s adapter holds: its tensors (canonical names, on the CPU) and its
    config (methods, backbone, base weights, library versions, a task model's record)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    config = {
        "format": "visionpeft",
        "format_version": FORMAT_VERSION,
        "methods": [{"name": name, "config": cfg.to_dict()} for name, cfg in attached_methods(model)],
        "backbone": backbone_of(model).describe(),
        "base_model": describe_base(model),
        "versions": library_versions(),
    }
    metadata = getattr(unwrap(model), "task_metadata", None)
    if callable(metadata):  # a task model's own record (a segmenter's head, id2label, palette)
        config["task"] = metadata()
    return tensors, config


def write_adapter_folder(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Writes ``visionpeft_adapter.safetensors`` + ``visionpeft_config.json`` (each atomically) into ``directory``."""
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _save_visionpeft(model: Any, directory: Path) -> None:
    write_adapter_folder(directory, *adapter_record(model))
    if peft_representable(model):
        export(model, directory, "peft")


def peft_representable(model: Any) -> bool:
    """Whether PEFT can load this adapter as it is: a plain module (not a pipeline) whose methods all export to
    PEFT, together in one PEFT folder, and add at least one adapted layer (PEFT has no adapter made of
    ``modules_to_save`` alone)."""
    if not isinstance(model, torch.nn.Module) or not can_export(model, "peft"):
        return False
    try:
        return collect_parts(require_state(model), "peft").adapts_layers
    except CheckpointError:  # parts PEFT cannot hold in one folder (two adapter types)
        return False


def adapter_config_path(directory: str | os.PathLike) -> Path | None:
    """The visionpeft config of a checkpoint folder (current or legacy name), or None."""
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        return directory / CONFIG_NAME
    legacy = directory / LEGACY_NAMES[1]
    if legacy.is_file():
        try:
            if json.loads(legacy.read_text()).get("format") == "visionpeft":
                return legacy
        except (OSError, ValueError, AttributeError):
            return None
    return None


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks the config of a visionpeft checkpoint folder."""
    return _checked_config(directory)[1]


def read_adapter_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked config and the tensors of a visionpeft checkpoint folder (current or legacy file names).

    Raises:
        CheckpointError: No visionpeft folder there, a damaged config or an unreadable weights file."""
    config_path, config = _checked_config(directory)
    return config, _read_weights(_weights_path(config_path))


def _weights_path(config_path: Path) -> Path:
    """The weights file beside a config file: its current name, or the legacy one beside a legacy config."""
    return config_path.parent / (WEIGHTS_NAME if config_path.name == CONFIG_NAME else LEGACY_NAMES[0])


def _checked_config(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(the config file found, current or legacy name; its checked contents)."""
    path = adapter_config_path(directory) or Path(directory) / CONFIG_NAME
    if not path.is_file():
        if (Path(directory) / LEGACY_NAMES[1]).is_file():
            raise CheckpointError(
                f"{directory} holds a PEFT adapter, not a visionpeft one ({CONFIG_NAME} is missing); "
                "load it with peft.PeftModel.from_pretrained"
            )
        raise CheckpointError(f"no adapter checkpoint at {directory}: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a visionpeft adapter config (not a JSON object)")
    if config.get("format") != "visionpeft":
        raise CheckpointError(f"{path} is not a visionpeft adapter config (format={config.get('format')!r})")
    methods = config.get("methods")
    if not isinstance(methods, list):
        raise CheckpointError(f"{path} has no 'methods' list (of {METHOD_ENTRY})")
    for i, entry in enumerate(methods):
        if not (
            isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("config", {}), dict)
        ):
            raise CheckpointError(f"{path}: methods[{i}] is not {METHOD_ENTRY}: {json.dumps(entry)[:80]}")
    if not isinstance(config.get("backbone", {}), dict):
        raise CheckpointError(f"{path}: 'backbone' is not an object")
    return path, config


def _mismatch_message(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``found`` from fitting ``expected``: shapes, names, and integer values for floating-point tensors
    (or the reverse), which a copy would silently convert."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = sorted(set(expected) & set(found))
    shapes = [
        f"{k} {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in common
        if found[k].shape != expected[k].shape
    ]
    dtypes = [
        f"{k} {_dtype_name(found[k])} vs model {_dtype_name(expected[k])}"
        for k in common
        if found[k].is_floating_point() != expected[k].is_floating_point()
    ]
    parts = []
    kinds = (("shape mismatch", shapes), ("dtype mismatch", dtypes), ("missing", missing), ("unexpected", unexpected))
    for label, items in kinds:
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts) if parts else None


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Names the floating-point tensors holding NaN or infinity (a diverged run's weights); None when none do."""
    bad = [
        name for name, tensor in sorted(tensors.items()) if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if not bad:
        return None
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    return (
        f"holds NaN or infinite values in {', '.join(bad[:3])}{more}: the run that saved it diverged; load an earlier "
        "checkpoint of that run (best, checkpoints/step-N) or train again with a lower learning rate"
    )


def load_adapter(
    model: Any,
    directory: str | os.PathLike,
    options: dict[str, dict[str, Any]] | None = None,
    check_base: bool = True,
) -> Any:
    """Loads a visionpeft adapter checkpoint into ``model``.

    The saved methods are attached first unless the model already carries exactly them; a model carrying other
    methods gets these added (stacking, e.g. textual inversion + LoRA from two runs). Tensors are matched by
    canonical name and shape. On any error the model is left as it was given.

    Args:
        model: The model (or pipeline) to load into.
        directory: A folder written by :func:`save_adapter`, a hub repo id (``user/name``) holding one, or a
            single-file Stable Diffusion LoRA (``.safetensors``, kohya / A1111 or diffusers keys; LyCORIS LoHa, LoKr,
            LoCon and OFT modules included).
        options: Per-method option overrides applied before attaching, e.g.
            ``{"coop": {"classnames": new_classes}}`` to evaluate learned prompts on other classes.
        check_base: Refuse a checkpoint trained on other base weights (its recorded ``base_model.sha256``
            differs from this model's frozen weights); False loads it anyway.

    Raises:
        CheckpointError: Missing or corrupt files, a checkpoint from another architecture (the message names
            the mismatched tensors), or trained on other weights.
    """
    if looks_like_repo_id(directory):
        directory = download_adapter(str(directory))
    directory = Path(directory)
    if directory.suffix == ".safetensors" and directory.is_file():  # a kohya / diffusers single-file LoRA
        from .conversions import import_lora

        return import_lora(model, directory)
    config_path, config = _checked_config(directory)
    family = backbone_of(model).family
    saved_family = config.get("backbone", {}).get("family")
    if saved_family != family:
        raise CheckpointError(
            f"{directory} holds an adapter for a {saved_family} backbone ({config['backbone'].get('class')}); "
            f"this model is {family}"
        )
    options = options or {}
    try:
        saved = [
            (m["name"], _as_config_dict(m["name"], {**m.get("config", {}), **options.get(m["name"], {})}))
            for m in config["methods"]
        ]
    except ConfigError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    current = [(name, cfg.to_dict()) for name, cfg in attached_methods(model)]
    found = _read_weights(_weights_path(config_path))
    before = methods_of(model)
    if current != saved:
        try:
            attach(model, saved, modules_to_save=config.get("backbone", {}).get("modules_to_save"))
        except VisionPEFTError as err:
            raise CheckpointError(f"cannot add the methods of {directory} to this model: {err}") from None
    added = [m for m in methods_of(model) if m not in before]
    everything = adapter_state_dict(model)
    expected = everything if not added else {k: t for m in added for k, t in m.named_state()}
    expected.update({k: t for k, t in head_state(model).items() if k in found})
    problem = _mismatch_message(expected, found)
    if problem:
        _undo(model, added, before)
        raise CheckpointError(f"{directory} does not fit this model ({problem})")
    problem = non_finite({name: found[name] for name in expected})
    if problem is None and check_base and "base_model" in config:  # absent: saved before bases were recorded
        problem = base_mismatch(model, config["base_model"])
    if problem:
        _undo(model, added, before)
        raise CheckpointError(f"{directory} {problem}")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(found[name].to(tensor.dtype))
    return model


def base_mismatch(model: Any, recorded: Any) -> str | None:
    """Why the recorded base weights are not this model's, or cannot be compared (a damaged record); None when they
    are this model's."""
    sha256 = recorded.get("sha256") if isinstance(recorded, dict) else None
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        key, value = ("base_model.sha256", sha256) if isinstance(recorded, dict) else ("base_model", recorded)
        return (
            f"records {key} = {json.dumps(value)[:40]}, not a sha256 of 64 hex digits, so the base weights cannot be "
            "checked; pass check_base=False (command line: --ignore-base-mismatch) to load it unchecked"
        )
    if sha256 == frozen_weights_sha256(model):
        return None
    ours = frozen_dtype(model)
    if (recorded.get("dtype") == "bfloat16") != (ours == "bfloat16"):
        logger.warning(
            "cannot check the base weights of this adapter: it was trained on %s weights and this model holds %s "
            "(bfloat16 rounds differently); make sure they are the same checkpoint",
            recorded.get("dtype"),
            ours,
        )
        return None
    source = recorded.get("source") or "unnamed weights"
    return (
        f"was trained on other base weights ({source}, frozen-weights sha256 {recorded['sha256'][:12]}); "
        "this model's differ. Load the weights it was trained on, or pass check_base=False "
        "(command line: --ignore-base-mismatch) to load it anyway"
    )


def _undo(model: Any, added: list, before: list) -> None:
    """Removes the methods a failed load attached."""
    if not added:
        return
    if not before:
        detach(model)
        return
    state = require_state(unwrap(model))
    for method in reversed(added):
        method.detach()
    state.methods = [m for m in state.methods if m not in added]
    apply_requires_grad(unwrap(model), state)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"no adapter weights at {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def _as_config_dict(name: str, options: dict[str, Any]) -> dict[str, Any]:
    return make_config(name, options).to_dict()
