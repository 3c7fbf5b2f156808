"""The tasks ``tools/train.py`` can run: the config's ``task:`` key picks a schema and a trainer here.

Registering a task names its schema, the trainer function (imported only when a run starts, so that
``--help`` and config errors answer without loading torch), and the inputs the task gives methods: values of
method options it fills in (``task_inputs``: class names, a placeholder token) and per-call inputs it passes
through the conditioning channel (``call_inputs``: a condition image).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..registry import TRAINERS
from .class_conditional import ClassConditionalConfig
from .classification import ClassificationConfig
from .control import ControlConfig
from .personalization import PersonalizationConfig
from .pretrain_text_to_image import PretrainTextToImageConfig
from .segmentation import SegmentationConfig


@dataclass(frozen=True)
class TaskSpec:
    """A trainable task.

    Attributes:
        name: The ``task:`` value. schema: Its config dataclass. runner: ``module:function`` of the trainer.
        task_inputs: Method options the task fills in. call_inputs: Per-call inputs the task provides.
        pipeline_tag: The hub's task name for the run's model card (``image-classification``, ...).
    """

    name: str
    schema: type
    runner: str
    task_inputs: frozenset[str] = frozenset()
    call_inputs: frozenset[str] = frozenset()
    pipeline_tag: str | None = None

    def trainer(self) -> Callable:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


def register(spec: TaskSpec) -> TaskSpec:
    return TRAINERS.register(spec.name)(spec)


register(
    TaskSpec(
        "classification",
        ClassificationConfig,
        "visionpeft.trainers.classification:run",
        task_inputs=frozenset({"classnames"}),
        pipeline_tag="image-classification",
    )
)
register(
    TaskSpec(
        "personalization",
        PersonalizationConfig,
        "visionpeft.trainers.personalization:run",
        task_inputs=frozenset({"token"}),
        pipeline_tag="text-to-image",
    )
)
register(
    TaskSpec(
        "class_conditional",
        ClassConditionalConfig,
        "visionpeft.trainers.class_conditional:run",
        pipeline_tag="unconditional-image-generation",
    )
)
register(
    TaskSpec(
        "control",
        ControlConfig,
        "visionpeft.trainers.control:run",
        call_inputs=frozenset({"control_image"}),
        pipeline_tag="text-to-image",
    )
)


register(
    TaskSpec(
        "segmentation", SegmentationConfig, "visionpeft.trainers.segmentation:run", pipeline_tag="image-segmentation"
    )
)
register(
    TaskSpec(
        "pretrain_text_to_image",
        PretrainTextToImageConfig,
        "visionpeft.demo.pretrain_sd:run",
        pipeline_tag="text-to-image",
    )
)


def task_spec(name: str) -> TaskSpec:
    """The registered task ``name`` (a :class:`ConfigError` with a suggestion otherwise)."""
    return TRAINERS.get(name)
