"""Task models: modules that wrap a library model and own heads (the CLIP classifier; a segmenter and a control
holder follow). Each says through the :class:`TaskModel` protocol which library model ``attach`` adapts and which
heads train with every method."""

from __future__ import annotations

from ..backbones.base import TaskModel
from .clip_classifier import SINGLE_TEMPLATE, CLIPClassifier, prompt_learner

__all__ = ["SINGLE_TEMPLATE", "CLIPClassifier", "TaskModel", "prompt_learner"]
