"""The model libraries visionpeft builds and reads models of: one table, one entry per library.

An entry names the library's adapter file (a module of this package with three functions: ``create(cfg,
num_classes)`` builds the model a config's ``model`` section names, ``data_config(model)`` says how it reads images
and ``fixed_input_size(model)`` the only input size it takes, or None) and the
:class:`~visionpeft.backbones.base.Backbone` classes describing its model families, plus plain facts: the package its
models come from, the source id of hub weights recorded with adapters, how its classifier classifies, and the config
change that lets its model take another input size. This module imports no torch: the config layer reads the names from
it (``model.library``'s choices); the adapter files load when a model is built or read.

A new library is one adapter file plus one entry here; a new model family of a library is one ``Backbone`` file
plus its name in the entry's ``adapters``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

from ..errors import ConfigError, did_you_mean

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: How an image task makes a classifier of a library's model (the task layer implements each kind):
#: ``head``: the model is one (``model(images)`` are logits; recipe head options apply to a linear ``head``),
#: ``text``: by class-name text embeddings (an image-text model: CLIP), ``output``: the model returns an output
#: object whose ``logits`` are the classifier's.
CLASSIFIER_KINDS = ("head", "text", "output")


@dataclass(frozen=True)
class DataConfig:
    """How a model's pretraining read images: normalisation, test-time crop fraction, resize interpolation."""

    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class Library:
    """One model library.

    Attributes:
        name: The ``model.library`` value.
        summary: What ``model.name`` names for it (config help).
        module: Its adapter file in ``visionpeft.backbones`` (``create`` / ``data_config`` / ``fixed_input_size``).
        adapters: Its ``Backbone`` classes as ``"module:Class"``, tried in order by ``get_backbone``.
        package: The Python package its model classes live in (None: any module).
        hub_source: The weights' source id when they come from a hub name (``{name}``, ``{tag}``:
            ``model.name``, ``model.pretrained_tag``).
        classifier: One of :data:`CLASSIFIER_KINDS`; None when it builds no image model (pipelines).
        resize: The config change that builds its model for another fixed input size (``{size}``), if any.
        any_size: The config change that lets its model take any input size, if any.
    """

    name: str
    summary: str
    module: str
    adapters: tuple[str, ...]
    package: str | None
    hub_source: str
    classifier: str | None
    resize: str | None = None
    any_size: str | None = None

    def adapter_file(self) -> ModuleType:
        """The adapter file (imported on first use)."""
        return importlib.import_module(f"{__package__}.{self.module}")

    def backbone_classes(self) -> list[type]:
        """The ``Backbone`` classes of its families, in the order they are tried."""
        classes = []
        for spec in self.adapters:
            module, _, name = spec.partition(":")
            classes.append(getattr(importlib.import_module(f"{__package__}.{module}"), name))
        return classes


#: Every library, in the order models are recognised (``generic``, which takes any ``nn.Module``, last).
LIBRARIES: dict[str, Library] = {
    entry.name: entry
    for entry in (
        Library(
            "timm",
            "a timm model name with its tag (vit_base_patch16_224.augreg_in21k)",
            "timm_models",
            ("timm_vit:TimmViT", "timm_eva:TimmEva"),
            "timm",
            "timm/{name}",
            "head",
            resize="set model.img_size={size} (timm resizes the position embeddings) or "
            "model.kwargs.dynamic_img_size=true",
            any_size="set model.kwargs.dynamic_img_size=true (timm interpolates the position embeddings)",
        ),
        Library(
            "open_clip",
            "an open_clip architecture (ViT-B-16), weights from model.pretrained_tag",
            "open_clip",
            ("open_clip:OpenCLIP",),
            "open_clip",
            "{name}/{tag}",
            "text",
        ),
        Library(
            "transformers",
            "a Hugging Face hub id or a save_pretrained folder (google/vit-base-patch16-224)",
            "transformers_models",
            (),
            "transformers",
            "{name}",
            "output",
        ),
        Library(
            "diffusers",
            "a diffusers pipeline: hub id or save_pretrained folder",
            "diffusers_loading",
            (
                "diffusers_models:DiffusersUNet",
                "diffusers_models:DiffusersDiT",
                "diffusers_flow:DiffusersFluxPipeline",
                "diffusers_flow:DiffusersSD3Pipeline",
                "diffusers_models:DiffusersXLPipeline",
                "diffusers_models:DiffusersPipeline",
            ),
            "diffusers",
            "{name}",
            None,
        ),
        Library(
            "generic",
            "any torch model, made by a callable named package.module:function (num_classes and model.kwargs "
            "are its arguments)",
            "generic",
            ("generic:GenericBackbone",),
            None,
            "{name}",
            "head",
        ),
    )
}

#: The libraries the image tasks (classification, segmentation) build their ``model`` from.
IMAGE_LIBRARIES = tuple(name for name, entry in LIBRARIES.items() if entry.classifier is not None)


def library(name: str) -> Library:
    """The entry of ``name``.

    Raises:
        ConfigError: An unknown library, in one line with the closest name.
    """
    if name not in LIBRARIES:
        raise ConfigError(
            f"unknown model library '{name}'{did_you_mean(name, LIBRARIES)}; one of {', '.join(LIBRARIES)}"
        )
    return LIBRARIES[name]
