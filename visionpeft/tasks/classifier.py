"""The classifier of a classification run, made of the model the library table builds.

The table says how each library's model classifies (``Library.classifier``); this module makes a classifier of each
kind: ``head`` - the model is one (timm with a ``num_classes`` head, a generic module), the recipe's head options
apply to its linear ``head``; ``text`` - a :class:`~visionpeft.tasks.clip_classifier.CLIPClassifier` over the class
names (a linear head initialised from their text embeddings, or class prompts); ``output`` - the model returns an
output object (transformers' ``ImageClassifierOutput``), :class:`LogitsClassifier` hands its ``logits`` on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..backbones.factory import create_model, recipe_head
from ..backbones.generic import conventional_heads
from ..backbones.libraries import library
from ..errors import ConfigError
from .clip_classifier import CLIPClassifier


class LogitsClassifier(nn.Module):
    """A task model over a library classifier that returns an output object: ``forward`` gives its ``logits``; the
    library's classifier (transformers' ``classifier``) is the head, trained with every method."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def inner_model(self) -> nn.Module:
        """The task-model protocol: the library model methods adapt."""
        return self.model

    def task_heads(self) -> dict[str, nn.Module | None]:
        """The task-model protocol: the library's classifier, named ``head``."""
        heads = list(conventional_heads(self.model).values())
        return {"head": heads[0] if heads else None}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).logits


def _own_head(model: nn.Module, cfg: Any, classnames: list[str] | None) -> nn.Module:
    recipe_head(model, getattr(cfg, "head_norm", "none"), getattr(cfg, "head_init_std", None))
    return model


def _text_classifier(model: nn.Module, cfg: Any, classnames: list[str] | None) -> nn.Module:
    return CLIPClassifier(model, classnames, head=cfg.clip_head == "linear")


def _output_logits(model: nn.Module, cfg: Any, classnames: list[str] | None) -> nn.Module:
    return LogitsClassifier(_own_head(model, cfg, classnames))


#: Classifier kind (``Library.classifier``) -> how the task makes a classifier of the library's model.
CLASSIFIERS: dict[str, Callable[[nn.Module, Any, list[str] | None], nn.Module]] = {
    "head": _own_head,
    "text": _text_classifier,
    "output": _output_logits,
}


def create_classifier(cfg: Any, num_classes: int, classnames: list[str] | None = None) -> nn.Module:
    """The classifier of an experiment (``cfg`` is the ``model`` section of the config) over ``num_classes``
    classes named ``classnames`` (label order).

    Raises:
        ConfigError: A library that builds no image model, recipe head options on a classifier whose head comes
            from class-name text, or such a classifier without class names; before any model is built.
    """
    entry = library(cfg.library)
    if entry.classifier is None:
        raise ConfigError(f"model.library={entry.name} builds no image classifier")
    head_options = getattr(cfg, "head_norm", "none") != "none" or getattr(cfg, "head_init_std", None) is not None
    if entry.classifier == "text":
        if head_options:
            raise ConfigError(
                "model.head_norm / model.head_init_std apply to timm classifiers; an "
                f"{entry.name} classifier's head starts from the class-name text embeddings"
            )
        if not classnames:
            raise ConfigError(f"an {entry.name} classifier needs the dataset's class names")
    return CLASSIFIERS[entry.classifier](create_model(cfg, num_classes), cfg, classnames)
