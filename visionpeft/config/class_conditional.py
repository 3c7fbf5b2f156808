"""The ``class_conditional`` task's config: DiT fine-tuning on a labelled dataset (DiffFit's setting)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..schema import section, setting
from .diffusion_objective import DiffusionOptim
from .sections import TASK_HELP, DiffusersModel, DiffusionTrain


@dataclass
class DiTModel(DiffusersModel):
    name: str = setting("facebook/DiT-XL-2-256", "hub id or local folder of a diffusers DiTPipeline", path="or_id")


@dataclass
class ClassData:
    """``data``: a dataset of the toolkit by name (``imagefolder`` reads ``root/<split>/<class>/``)."""

    name: str = setting("imagefolder", "a registered dataset")
    root: str | None = setting(None, "where the data lives", path="folder")
    split: str = setting("train", "the training split")
    options: dict[str, Any] = setting({}, "extra keyword arguments of the dataset builder")
    size: int | None = setting(None, "training resolution (null: the pipeline's native one)", min=1)
    flip: bool = setting(True, "random horizontal flips (DiT's only augmentation)")
    class_init: str = setting(
        "normal",
        "normal re-initialises the dataset's class rows (N(0, 0.02)); keep does not",
        choices=("normal", "keep"),
    )
    batch_size: int = setting(64, "images per optimizer step, whatever the number of processes and grad_accum", min=1)


@dataclass
class ClassOptim(DiffusionOptim):
    """DiT's AdamW at 10x its learning rate (DiffFit, sec. 4.1), constant, no weight decay; 24k steps at batch 64
    is DiffFit's setting as re-run by Diff-Tuning (NeurIPS 2024)."""

    bias_decay: bool = setting(True, "apply weight decay to biases and norm weights (1-D tensors) too")
    schedule: str = setting(
        "constant",
        "learning-rate schedule after warmup",
        choices=("constant", "constant_with_warmup", "cosine", "linear", "polynomial"),
    )
    steps: int | None = setting(24000, "run length in optimizer steps (or set epochs)", min=1)
    warmup_steps: int | None = setting(0, "linear warmup from 0, in optimizer steps (or warmup_epochs)", min=0)


@dataclass
class ClassTrain(DiffusionTrain):
    """DiT keeps an EMA at 0.9999 and samples with it; label dropout for classifier-free guidance."""

    output_dir: str = setting("runs/class_conditional", "parent folder of run folders", path=True)
    ema_decay: float | None = setting(0.9999, "EMA of the trained weights (DiT: 0.9999); null: none", min=0, max=1)
    eval_every: int | None = setting(1000, "validate every N optimizer steps (and at the end)", min=1)
    validation_images: int = setting(4, "images per validation class", min=1)
    validation_steps: int = setting(50, "DiTPipeline sampling steps", min=1)
    class_dropout: float = setting(0.1, "DiT's label-dropout rate (classifier-free guidance)", min=0, max=1)
    learn_sigma: bool = setting(True, "add the variational-bound term for the learned variance")
    validation_classes: list[str] = setting([], "one grid row per class at each validation")
    guidance_scale: float = setting(4.0, "classifier-free guidance of validation samples", min=0)


@dataclass
class ClassConditionalConfig:
    """A class-conditional DiT run."""

    task: str = setting("class_conditional", TASK_HELP)
    model: DiTModel = section(DiTModel, "the DiT pipeline")
    method: Any = setting("difffit", "a method name, {name: ..., options}, or a list of those")
    data: ClassData = section(ClassData, "the labelled images")
    optim: ClassOptim = section(ClassOptim, "optimizer and schedule")
    train: ClassTrain = section(ClassTrain, "run settings")
