"""Reading a diffusers model folder back as the method that exports one (the mirror of ``ExportParts.models``).

A method declares the diffusers class(es) of its folder (``Method.diffusers_folder_class``: ``ControlNetModel``,
``FluxControlNetModel`` and ``SD3ControlNetModel`` for ``controlnet``, ``T2IAdapter`` for ``t2i_adapter``);
:func:`read_diffusers_folder` reads ``config.json``'s ``_class_name``, finds that method, loads the folder with
diffusers' own ``from_pretrained`` and derives the method's options from the loaded model's config (diffusers'
defaults filled in). The caller attaches the method with those options (``vp.attach``) and hands it the loaded model
(``Method.load_folder_model``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..registry import METHODS
from .base import folder_class_names


@dataclass
class DiffusersFolder:
    """A diffusers model folder read as a method.

    Attributes:
        method: The registered method that reads this class of folder.
        options: Its options, shaped as the folder's model.
        class_name: The folder's diffusers class (``ControlNetModel``).
        model: The model diffusers loaded from the folder; ``Method.load_folder_model`` takes its weights.
    """

    method: str
    options: dict[str, Any]
    class_name: str
    model: nn.Module


def folder_classes() -> dict[str, str]:
    """diffusers class name -> the method that reads a folder of it."""
    classes = {}
    for name in METHODS.names():
        for folder_class in folder_class_names(METHODS.get(name)):
            classes[folder_class] = name
    return classes


def read_diffusers_folder(path: Path) -> DiffusersFolder:
    """Reads a ``save_pretrained`` folder of a diffusers model some method exports (this toolkit's
    ``RUN/controlnet`` of a U-Net, Flux or SD3 run, or a released ControlNet / T2I-Adapter).

    Raises:
        CheckpointError: ``config.json`` is not JSON, names a class no method reads, or the folder does not load.
    """
    import diffusers

    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({err})") from None
    classes = folder_classes()
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name not in classes:
        shown = class_name if isinstance(class_name, str) else "config.json without a _class_name"
        raise CheckpointError(f"{path} holds a {shown}, not a model folder a method reads ({', '.join(classes)})")
    try:
        model = getattr(diffusers, class_name).from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} cannot be loaded as a {class_name}: {str(err).splitlines()[0][:160]}") from None
    method = classes[class_name]
    return DiffusersFolder(method, METHODS.get(method).options_from_folder(dict(model.config)), class_name, model)
