"""The ``segmentation`` task's config: a plain ViT (timm / open_clip) + decode head on a segmentation dataset.

Defaults follow the ADE20K recipes of mmsegmentation and DINOv2 (512 x 512 crops, batch 16, AdamW with a
polynomial decay after 1,500 linear warmup iterations, evaluation with a 512 sliding window at stride 341).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..schema import section, setting
from .sections import SCHEDULES, TASK_HELP, OptimConfig, RunSettings, VisionModel

#: The decode heads (``visionpeft.tasks.seg_heads.HEADS``; repeated here so config checks load no torch).
HEAD_NAMES = ("linear", "linear4", "setr_pup", "upernet")


@dataclass
class HeadConfig:
    """``head``: the decode head."""

    name: str = setting("upernet", "decode head", choices=HEAD_NAMES)
    num_classes: int | None = setting(None, "classes (null: the dataset's; if set it must agree with it)", min=1)
    indices: list[int] | None = setting(None, "blocks the head reads (null: the head's default for the depth)")
    aux: bool = setting(False, "setr_pup: auxiliary heads on the earlier blocks (loss weight 0.4)")
    channels: int | None = setting(None, "conv head width (null: setr_pup 256, upernet 512)", min=1)
    dropout: float = setting(0.0, "dropout before the classifier", min=0, below=1)


@dataclass
class SegmentationData:
    """``data``: a registered segmentation dataset and mmseg's training pipeline."""

    name: str = setting("ade20k", "ade20k, voc2012, cityscapes, imagefolder-seg or texture-mosaic")
    root: str | None = setting(None, "the dataset's folder", path="folder")
    train_split: str = setting("train", "training split")
    val_split: str | None = setting(None, "validation split (selects the best checkpoint); null: none")
    test_split: str | None = setting("val", "split evaluated during and after training (ADE20K: val); null: none")
    crop_size: list[int] = setting([512, 512], "training crop (height, width)")
    scale: list[int] = setting([2048, 512], "(long, short) edge box images are resized into (train x ratio)")
    ratio_range: list[float] = setting([0.5, 2.0], "training resize ratio range")
    cat_max_ratio: float = setting(0.75, "largest share of a crop one class may cover (1: off)", above=0, max=1)
    photometric: bool = setting(True, "photometric distortion when training")
    batch_size: int = setting(16, "crops per optimizer step, whatever the number of processes and grad_accum", min=1)
    eval_batch_size: int = setting(1, "evaluation images per batch and process", min=1)
    num_workers: int = setting(4, "DataLoader workers", min=0)
    options: dict[str, Any] = setting({}, "extra keyword arguments of the dataset builder")


@dataclass
class SegmentationEval:
    """``eval``: how evaluation infers."""

    mode: str = setting("slide", "whole image or sliding window", choices=("whole", "slide"))
    crop: list[int] = setting([512, 512], "sliding window (height, width)")
    stride: list[int] = setting([341, 341], "sliding window step (height, width)")
    grid_images: int = setting(4, "evaluation images shown in the predictions.png grid", min=0)


@dataclass
class SegmentationOptim(OptimConfig):
    """DINOv2 / mmseg: AdamW, polynomial decay (power 1) after 1,500 linear warmup iterations, 160k iterations."""

    lr: float = setting(1e-3, "peak learning rate (see lr_scale_batch)", min=0)
    weight_decay: float = setting(1e-4, "weight decay (AdamW: decoupled)", min=0)
    schedule: str = setting("polynomial", "learning-rate schedule after warmup", choices=SCHEDULES)
    steps: int | None = setting(160_000, "run length in optimizer steps (or set epochs)", min=1)
    warmup_steps: int | None = setting(1500, "linear warmup from 0, in optimizer steps (or warmup_epochs)", min=0)
    head_lr_mult: float = setting(1.0, "learning-rate multiplier of the decode head(s) (mmseg full FT: 10)", above=0)


@dataclass
class SegmentationTrain(RunSettings):
    eval_every: int | None = setting(16_000, "evaluate every N optimizer steps (and at the end)", min=1)


@dataclass
class SegmentationConfig:
    """A semantic-segmentation run: backbone, method(s), decode head, data, evaluation, optimizer, run settings."""

    task: str = setting("segmentation", TASK_HELP)
    model: VisionModel = section(VisionModel, "the backbone")
    method: Any = setting("linear", "a method name, {name: ..., options}, or a list of those (a hybrid)")
    head: HeadConfig = section(HeadConfig, "the decode head")
    data: SegmentationData = section(SegmentationData, "the dataset")
    eval: SegmentationEval = section(SegmentationEval, "evaluation")
    optim: SegmentationOptim = section(SegmentationOptim, "optimizer and schedule")
    train: SegmentationTrain = section(SegmentationTrain, "run settings")
