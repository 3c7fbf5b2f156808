"""The tasks ``tools/train.py`` can run: the config's ``task:`` key picks a schema, a trainer, an evaluator of a
saved run and a predictor here.

Registering a task names its schema; its trainer, evaluator and predictor as ``module:function`` strings (imported
only when used, so that ``--help`` and config errors answer without loading torch, and ``visionpeft eval`` /
``predict`` name no task: they look the run's task up here); which ``eval`` / ``predict`` options apply to it; and
the inputs the task gives methods: values of method options it fills in (``task_inputs``: class names, a placeholder
token) and per-call inputs it passes through the conditioning channel (``call_inputs``: a condition image).

An evaluator is ``evaluate(config, request: EvalRequest) -> list[str]`` (the lines to print) and a predictor
``predict(config, request: PredictRequest) -> list[str]`` (:mod:`visionpeft.trainers.saved_run`). A task without
one says why (``no_predictor``), in one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import TRAINERS
from .class_conditional import ClassConditionalConfig
from .classification import ClassificationConfig
from .control import ControlConfig
from .ip_adapter import IPAdapterConfig
from .personalization import PersonalizationConfig
from .pretrain_clip import PretrainCLIPConfig
from .pretrain_text_to_image import PretrainTextToImageConfig
from .segmentation import SegmentationConfig

#: ``eval`` / ``predict`` options that apply to some tasks only (the others apply to every task)
TASK_OPTIONS = ("inputs", "out", "split", "batch_size", "mode", "samples", "clip", "top_k", "prompt", "seeds")


def _function(reference: str) -> Callable:
    module, _, function = reference.partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class TaskSpec:
    """A trainable task.

    Attributes:
        name: The ``task:`` value. schema: Its config dataclass. runner: ``module:function`` of the trainer.
        evaluator: ``module:function`` evaluating a saved run. predictor: ``module:function`` applying a saved run
            to new inputs (None: see ``no_predictor``). no_predictor: Why the task has no predictor.
        eval_options / predict_options: Which of :data:`TASK_OPTIONS` apply to the task's evaluator / predictor.
        evaluates / predicts: What they do, in a few words (the commands' ``--help`` lists them).
        task_inputs: Method options the task fills in. call_inputs: Per-call inputs the task provides.
        pipeline_tag: The hub's task name for the run's model card (``image-classification``, ...).
    """

    name: str
    schema: type
    runner: str
    evaluator: str
    predictor: str | None = None
    no_predictor: str = ""
    eval_options: frozenset[str] = frozenset()
    predict_options: frozenset[str] = frozenset()
    evaluates: str = ""
    predicts: str = ""
    task_inputs: frozenset[str] = frozenset()
    call_inputs: frozenset[str] = frozenset()
    pipeline_tag: str | None = None

    def trainer(self) -> Callable:
        return _function(self.runner)

    def evaluate_function(self) -> Callable:
        """``evaluate(config, request) -> lines`` of the task."""
        return _function(self.evaluator)

    def predict_function(self) -> Callable:
        """``predict(config, request) -> lines`` of the task; a :class:`ConfigError` saying why it has none."""
        if self.predictor is None:
            raise ConfigError(f"a {self.name} run has no predictor: {self.no_predictor}")
        return _function(self.predictor)

    def options(self, command: str) -> frozenset[str]:
        """The :data:`TASK_OPTIONS` that apply to this task's ``command`` (``eval`` / ``predict``)."""
        return self.eval_options if command == "eval" else self.predict_options

    def check_options(self, command: str, given: dict[str, object]) -> None:
        """A :class:`ConfigError` naming the first given option that does not apply to this task's ``command``
        and the tasks it applies to (options given as None, False or [] count as not given)."""
        for option, value in given.items():
            if option in TASK_OPTIONS and value not in (None, False, []) and option not in self.options(command):
                users = ", ".join(n for n in TRAINERS.names() if option in TRAINERS.get(n).options(command))
                what = "input files or names" if option == "inputs" else "--" + option.replace("_", "-")
                raise ConfigError(f"{command} on a {self.name} run takes no {what} (it applies to: {users})")


def register(spec: TaskSpec) -> TaskSpec:
    return TRAINERS.register(spec.name)(spec)


register(
    TaskSpec(
        "classification",
        ClassificationConfig,
        "visionpeft.trainers.classification:run",
        "visionpeft.trainers.classification_eval:evaluate",
        "visionpeft.trainers.classification_eval:predict",
        evaluates="top-1 / top-5 accuracy and the loss on a split (--split, --batch-size)",
        predicts="image files -> a CSV file (--out): the top-k classes and probabilities per image (--top-k)",
        eval_options=frozenset({"split", "batch_size"}),
        predict_options=frozenset({"inputs", "out", "top_k", "batch_size"}),
        task_inputs=frozenset({"classnames"}),
        pipeline_tag="image-classification",
    )
)
register(
    TaskSpec(
        "personalization",
        PersonalizationConfig,
        "visionpeft.trainers.personalization:run",
        "visionpeft.trainers.personalization_eval:evaluate",
        "visionpeft.trainers.personalization_eval:predict",
        evaluates="validation prompts sampled, scored by CLIP-T / CLIP-I (--clip) and the tiny_sd judge (--samples)",
        predicts="--prompt TEXT (default: the validation prompts) x --seeds -> images",
        eval_options=frozenset({"samples", "out", "clip"}),
        predict_options=frozenset({"out", "prompt", "seeds"}),
        task_inputs=frozenset({"token"}),
        pipeline_tag="text-to-image",
    )
)
register(
    TaskSpec(
        "class_conditional",
        ClassConditionalConfig,
        "visionpeft.trainers.class_conditional:run",
        "visionpeft.trainers.class_conditional_eval:evaluate",
        "visionpeft.trainers.class_conditional_eval:predict",
        evaluates="samples of each class as a grid (--samples per class)",
        predicts="class names (default: the validation classes) x --seeds -> images",
        eval_options=frozenset({"samples", "out"}),
        predict_options=frozenset({"inputs", "out", "seeds"}),
        pipeline_tag="unconditional-image-generation",
    )
)
register(
    TaskSpec(
        "control",
        ControlConfig,
        "visionpeft.trainers.control:run",
        "visionpeft.trainers.control_eval:evaluate",
        "visionpeft.trainers.control_eval:predict",
        evaluates="fill IoU on held-out pairs for fill50k data, the validation grid otherwise (--samples pairs)",
        predicts="condition images (photos when the run computes its conditions) with --prompt x --seeds -> images",
        eval_options=frozenset({"samples", "out"}),
        predict_options=frozenset({"inputs", "out", "prompt", "seeds"}),
        call_inputs=frozenset({"control_image"}),
        pipeline_tag="text-to-image",
    )
)
register(
    TaskSpec(
        "ip_adapter",
        IPAdapterConfig,
        "visionpeft.trainers.ip_adapter:run",
        "visionpeft.trainers.ip_adapter_eval:evaluate",
        evaluates="the validation grid of the first training images as image prompts (--samples of them)",
        no_predictor="draw with `visionpeft generate --model BASE --ip-adapter RUN --ip-image REF.png --prompt TEXT`",
        eval_options=frozenset({"samples", "out"}),
        task_inputs=frozenset({"image_embed_dim"}),
        call_inputs=frozenset({"ip_image_embeds"}),
        pipeline_tag="text-to-image",
    )
)
register(
    TaskSpec(
        "segmentation",
        SegmentationConfig,
        "visionpeft.trainers.segmentation:run",
        "visionpeft.trainers.segmentation_eval:evaluate",
        "visionpeft.trainers.segmentation_eval:predict",
        evaluates="the per-class IoU table and mIoU / aAcc / mAcc on a split (--split, --batch-size, --mode)",
        predicts="image files -> <stem>_labels.png (class ids), <stem>_color.png and legend.png (--mode)",
        eval_options=frozenset({"split", "batch_size", "mode"}),
        predict_options=frozenset({"inputs", "out", "mode"}),
        pipeline_tag="image-segmentation",
    )
)
register(
    TaskSpec(
        "pretrain_text_to_image",
        PretrainTextToImageConfig,
        "visionpeft.demo.pretrain_text_to_image:run",
        "visionpeft.demo.pretrain_sd_eval:evaluate",
        evaluates="the sample grid of the validation prompts from RUN/pipeline (--samples per prompt)",
        no_predictor="the run's pipeline/ folder is a plain diffusers pipeline; draw from it with "
        "`visionpeft generate --model RUN/pipeline --prompt TEXT`",
        eval_options=frozenset({"samples", "out"}),
        pipeline_tag="text-to-image",
    )
)
register(
    TaskSpec(
        "pretrain_clip",
        PretrainCLIPConfig,
        "visionpeft.demo.pretrain_clip:run",
        "visionpeft.demo.pretrain_clip_eval:evaluate",
        evaluates="zero-shot top-1 of RUN/model on clip_mix (--split, default test), held-in / held-out classes",
        no_predictor="the run's model/ folder is a plain open_clip folder; load it with "
        "open_clip.create_model('local-dir:RUN/model')",
        eval_options=frozenset({"split"}),
        pipeline_tag="zero-shot-image-classification",
    )
)


def task_spec(name: str) -> TaskSpec:
    """The registered task ``name`` (a :class:`ConfigError` with a suggestion otherwise)."""
    return TRAINERS.get(name)


def commands_help(command: str) -> str:
    """What ``eval`` / ``predict`` do for each registered task, one line each (the commands' ``--help``)."""
    lines = [f"what {command} does, by the run's task:"]
    for name in TRAINERS.names():
        spec = TRAINERS.get(name)
        text = spec.evaluates if command == "eval" else spec.predicts or f"no predictor: {spec.no_predictor}"
        lines.append(f"  {name:<24} {text}")
    return "\n".join(lines)
