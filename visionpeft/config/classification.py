"""The ``classification`` task's config: timm / open_clip classifiers on a registered dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..schema import section, setting
from .sections import OPTIMIZERS, TASK_HELP, OptimConfig, RunSettings, VisionModel


@dataclass
class ModelConfig(VisionModel):
    """``model``: the classifier's model, built by a library of the table (``model.library``); how each library's
    model becomes a classifier is ``visionpeft/tasks/classifier.py``'s."""

    clip_head: str = setting(
        "linear",
        "open_clip: linear head from class-name text embeddings, or prompts (zero-shot / CoOp)",
        choices=("linear", "prompts"),
    )
    head_norm: str = setting(
        "none",
        "timm: before the classifier, none or batchnorm (BatchNorm1d(affine=False, eps=1e-6): AdaptFormer's "
        "main_image.py, after MAE's linear probing)",
        choices=("none", "batchnorm"),
    )
    head_init_std: float | None = setting(
        None,
        "timm: re-initialise the classifier weight with trunc_normal(std), bias 0 (AdaptFormer: 0.01); "
        "null: timm's init",
        above=0,
    )


@dataclass
class DataConfig:
    """``data``: a registered dataset and its loaders."""

    name: str = setting("cifar100", "a registered dataset (cifar10, cifar100, imagefolder, vtab-<task>, ...)")
    root: str | None = setting(None, "where the data lives (or goes, with download)", path="folder")
    download: bool = setting(False, "let torchvision download when root lacks the files")
    train_split: str = setting("train", "training split")
    val_split: str | None = setting(None, "validation split (selects the best checkpoint); null: none")
    test_split: str | None = setting("test", "test split; null: none")
    batch_size: int = setting(64, "images per optimizer step, whatever the number of processes and grad_accum", min=1)
    eval_batch_size: int = setting(128, "evaluation batch per process", min=1)
    num_workers: int = setting(2, "DataLoader workers", min=0)
    img_size: int = setting(224, "input resolution", min=1)
    augment: str = setting("none", "none (resize only: the VTAB protocol) or crop_flip", choices=("none", "crop_flip"))
    shots: int | None = setting(None, "few-shot: training images per class (null: all)", min=1)
    class_split: str | None = setting(
        None, "base or new half of the classes (CoCoOp's base-to-new protocol)", choices=(None, "base", "new")
    )
    options: dict[str, Any] = setting({}, "extra keyword arguments of the dataset builder")


@dataclass
class ClassificationOptim(OptimConfig):
    """VPT's recipe: SGD, cosine after 10 warmup epochs of 100."""

    name: str = setting("sgd", "optimizer (sgd, adamw, prodigy: see the shared optim section)", choices=OPTIMIZERS)
    lr: float = setting(0.1, "peak learning rate (see lr_scale_batch)", min=0)
    epochs: int | None = setting(100, "run length in passes over the training set (or set steps)", min=1)
    warmup_epochs: int | None = setting(10, "linear warmup from 0, in epochs (or set warmup_steps)", min=0)
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", min=0, below=1)


@dataclass
class ClassificationTrain(RunSettings):
    eval_every: int | None = setting(
        1, "evaluate every N epochs (epoch runs) or N steps (step runs), and at the end", min=1
    )


@dataclass
class ClassificationConfig:
    """An image-classification run: model, method(s), data, optimizer, run settings."""

    task: str = setting("classification", TASK_HELP)
    model: ModelConfig = section(ModelConfig, "the backbone")
    method: Any = setting("linear", "a method name, {name: ..., options}, or a list of those (a hybrid)")
    data: DataConfig = section(DataConfig, "the dataset")
    optim: ClassificationOptim = section(ClassificationOptim, "optimizer and schedule")
    train: ClassificationTrain = section(ClassificationTrain, "run settings")
