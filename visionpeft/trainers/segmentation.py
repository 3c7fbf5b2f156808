"""Semantic segmentation: a plain ViT + decode head trained by the shared run skeleton, evaluated as mmseg does.

Iteration-based (``optim.steps``); cross-entropy with the ignore index (plus SETR-PUP's auxiliary losses, weight
0.4); AdamW with a polynomial schedule after linear warmup and a learning-rate multiplier for the decode head(s).
Evaluation infers whole images or sliding windows, resizes the logits to each mask's original size and accumulates
mIoU / aAcc / mAcc over the whole split (``visionpeft.metrics.segmentation``). A finished run holds, besides the shared
outputs, ``per_class_iou.md`` and ``predictions.png`` (image | truth | prediction of fixed evaluation images, also
in TensorBoard); the adapters record the head, ``id2label`` and the palette.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

import visionpeft as vp

from ..backbones.factory import create_library_model, fixed_input_size
from ..backbones.libraries import library
from ..config import method_configs
from ..data.images import WorkerSafe
from ..data.segmentation import SegmentationTransform, build_segmentation_dataset, collate_eval
from ..data.transforms import normalization_of
from ..errors import ConfigError, DataError
from ..metrics.segmentation import SegmentationMetrics
from ..tasks.seg_heads import AUX_WEIGHT
from ..tasks.seg_inference import predict_labels
from ..tasks.segmenter import Segmenter
from .loop import Loop
from .run import Setup, run_task
from .seg_outputs import prediction_grid, write_outputs


class Paired(Dataset):
    """Applies a joint ``(image, mask)`` transform to a dataset built without one."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.transform(*self.dataset[index])


class SegmentationObjective:
    """Cross-entropy (ignore index, auxiliary heads weighted 0.4); mIoU / aAcc / mAcc on its evaluation loader.

    Args:
        num_classes: Classes. loader: Evaluation data (lists of images and masks, :func:`collate_eval`).
        eval_cfg: The ``eval`` config section (mode, crop, stride). ignore_index: The ignored label.
    """

    metric = "mIoU"

    def __init__(self, num_classes: int, loader: DataLoader | None, eval_cfg: Any, ignore_index: int = 255) -> None:
        self.num_classes, self.loader, self.eval_cfg, self.ignore_index = num_classes, loader, eval_cfg, ignore_index
        self.last: dict[str, Any] = {}  # the latest evaluation, per-class values included

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, masks = batch
        logits, aux = model(images, with_aux=True)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)
        for extra in aux:
            loss = loss + AUX_WEIGHT * F.cross_entropy(extra.float(), masks, ignore_index=self.ignore_index)
        return loss

    def evaluate(self, model: nn.Module, accelerator: Accelerator, loader: DataLoader | None = None) -> dict:
        loader = loader if loader is not None else self.loader
        if loader is None:
            return {}
        metrics = SegmentationMetrics(self.num_classes, ignore_index=self.ignore_index).to(accelerator.device)
        cfg = self.eval_cfg
        for images, masks in loader:
            sizes = [m.shape[-2:] for m in masks]
            preds = predict_labels(model, images, sizes, cfg.mode, tuple(cfg.crop), tuple(cfg.stride))
            for pred, mask in zip(preds, masks):
                metrics.update(pred[None], mask[None])
        self.last = metrics.compute()
        return {k: float(self.last[k]) for k in ("mIoU", "aAcc", "mAcc")}


@dataclass
class SegExperiment:
    """Everything built from a config, before training."""

    model: Segmenter
    train: Dataset
    evaluation: Dataset | None  # transformed, what the loop evaluates (val, else test)
    test: Dataset | None
    raw_eval: Dataset | None  # the same split without transform (the prediction grid)
    classes: list[str]
    palette: list


def _pair(config: DictConfig, key: str) -> tuple[int, int]:
    section, _, field = key.partition(".")
    value = list(config[section][field])
    if len(value) != 2 or any(v < 1 for v in value):
        raise ConfigError(f"{key} must be two positive numbers [height, width], got {value}")
    return int(value[0]), int(value[1])


def check_sizes(config: DictConfig) -> None:
    """The crop / window / stride fields are (height, width) pairs."""
    for key in ("data.crop_size", "data.scale", "eval.crop", "eval.stride"):
        _pair(config, key)
    low, high = config.data.ratio_range
    if not 0 < low <= high:
        raise ConfigError(f"data.ratio_range must be [low, high] with 0 < low <= high, got {[low, high]}")


def raw_dataset(config: DictConfig, split: str | None) -> Dataset | None:
    """A split without transform; ``head.num_classes``, when set, must agree with the dataset's classes."""
    if split is None:
        return None
    data, options = config.data, dict(config.data.options)
    if config.head.num_classes is not None:
        options["num_classes"] = config.head.num_classes
    dataset = build_segmentation_dataset(data.name, split, root=data.root, transform=None, **options)
    if len(dataset) == 0:
        raise DataError(f"split '{split}' of dataset '{data.name}' is empty")
    return dataset


def build_segmenter(config: DictConfig, classes: list[str], palette: list | None) -> Segmenter:
    """The backbone of ``config.model`` with the decode head of ``config.head`` (no method attached yet)."""
    cfg = config.model
    model = create_library_model(cfg, num_classes=0)
    h = config.head
    seg = vp.segmentation.build(
        model,
        head=h.name,
        num_classes=len(classes),
        indices=list(h.indices) if h.indices is not None else None,
        aux=h.aux,
        channels=h.channels,
        dropout=h.dropout,
        classes=classes,
        palette=palette,
    )
    _check_input_size(config, seg)
    return seg


def _check_input_size(config: DictConfig, seg: Segmenter) -> None:
    """A backbone with fixed position embeddings takes only its own size: training crops and evaluation windows
    must have it (and whole-image evaluation cannot), said before any image reaches it."""
    fixed = fixed_input_size(seg)
    if fixed is None:
        return
    crop, window = _pair(config, "data.crop_size"), _pair(config, "eval.crop")
    any_size = library(config.model.library).any_size  # how the library lets its model take any size, if it can
    fix = any_size or f"use {fixed[0]}x{fixed[1]} crops and eval.mode=slide"
    if crop != fixed:
        raise ConfigError(
            f"data.crop_size {list(crop)} does not fit model '{config.model.name}', built for "
            f"{fixed[0]}x{fixed[1]} px inputs; {fix}"
        )
    if config.eval.mode == "whole" or window != fixed:
        raise ConfigError(
            f"model '{config.model.name}' takes only {fixed[0]}x{fixed[1]} px inputs, so evaluation "
            f"must slide a window of that size (eval.mode=slide, eval.crop); or {fix}"
        )


def build_experiment(config: DictConfig) -> SegExperiment:
    """Datasets, the segmenter and its methods, as the config says (seeded); every check runs before training."""
    check_sizes(config)
    set_seed(config.train.seed)
    data = config.data
    train = raw_dataset(config, data.train_split)
    classes = [str(c) for c in train.classes]
    if len(classes) < 2:
        raise DataError(f"dataset '{data.name}' has {len(classes)} class(es); segmentation needs at least 2")
    palette = [list(c) for c in getattr(train, "palette", None) or []] or None
    ignore = int(getattr(train, "ignore_index", 255))
    val, test = raw_dataset(config, data.val_split), raw_dataset(config, data.test_split)
    seg = build_segmenter(config, classes, palette)
    vp.attach(seg, method_configs(config))
    mean, std = normalization_of(seg.inner_model())
    train_tf = SegmentationTransform(
        True,
        crop_size=_pair(config, "data.crop_size"),
        scale=_pair(config, "data.scale"),
        ratio_range=tuple(data.ratio_range),
        cat_max_ratio=data.cat_max_ratio,
        photometric=data.photometric,
        mean=mean,
        std=std,
        ignore_index=ignore,
    )
    eval_tf = SegmentationTransform(False, scale=_pair(config, "data.scale"), mean=mean, std=std, ignore_index=ignore)
    wrap = lambda ds, tf: WorkerSafe(Paired(ds, tf)) if ds is not None else None  # noqa: E731
    raw_eval = val if val is not None else test
    return SegExperiment(
        seg, wrap(train, train_tf), wrap(raw_eval, eval_tf), wrap(test, eval_tf), raw_eval, classes, palette
    )


def eval_loader(dataset: Dataset, config: DictConfig, batch_size: int | None = None) -> DataLoader:
    """An evaluation loader: in order, nothing dropped, images of any size as lists."""
    workers = config.data.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size or config.data.eval_batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_eval,
        persistent_workers=workers > 0,
    )


class SegmentationTrainer:
    """Builds the segmenter and its data; after training, tests the checkpoint chosen on the validation split and
    writes the per-class table and the prediction grid."""

    def build(self, config: DictConfig, accelerator: Accelerator, run_dir: Path) -> Setup:
        exp = build_experiment(config)
        ignore = int(getattr(exp.raw_eval, "ignore_index", 255)) if exp.raw_eval is not None else 255
        loader = accelerator.prepare(eval_loader(exp.evaluation, config)) if exp.evaluation is not None else None
        objective = SegmentationObjective(len(exp.classes), loader, config.eval, ignore)
        sizes = {k: len(v) for k, v in (("train", exp.train), ("eval", exp.evaluation)) if v is not None}
        summary = [
            f"data: {config.data.name}, {len(exp.classes)} classes, " + ", ".join(f"{k} {n}" for k, n in sizes.items())
        ]
        mult = config.optim.head_lr_mult
        return Setup(
            exp.model,
            exp.model,
            objective,
            exp.train,
            select_best=config.data.val_split is not None,
            loader={"num_workers": config.data.num_workers, "drop_last": True},
            summary=summary,
            state={"experiment": exp},
            lr_multipliers={"head.": mult, "aux_head.": mult},
        )

    def finish(self, config: DictConfig, loop: Loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        exp: SegExperiment = setup.state["experiment"]
        objective: SegmentationObjective = setup.objective
        results: dict[str, Any] = {}
        if config.data.val_split is not None and exp.test is not None:
            if (run_dir / "best").exists():
                vp.load_adapter(loop.unwrapped, run_dir / "best")  # test the checkpoint chosen on val
            loop.model.eval()
            test_loader = loop.accelerator.prepare(eval_loader(exp.test, config))
            with torch.no_grad():
                test = objective.evaluate(loop.model, loop.accelerator, test_loader)
            loop.log({f"test/{k}": v for k, v in test.items()})
            results["test"] = test
        elif objective.last:
            results["test"] = {k: float(objective.last[k]) for k in ("mIoU", "aAcc", "mAcc")}
        if loop.accelerator.is_main_process and exp.raw_eval is not None:
            loop.model.eval()
            grid = None
            if config.eval.grid_images:
                grid = prediction_grid(loop.unwrapped, exp.raw_eval, config, exp.palette, exp.classes)
                loop.trackers.log_images("eval/predictions", [grid], loop.step)  # train.report_to's tracker
            results["outputs"] = write_outputs(run_dir, objective.last, exp.classes, grid)
        return results


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Trains and evaluates (see :func:`~.run.run_task` for the options); returns ``eval`` / ``test`` metrics."""
    return run_task(SegmentationTrainer(), config, run_dir, **options)


__all__ = [
    "SegmentationObjective",
    "SegmentationTrainer",
    "build_experiment",
    "build_segmenter",
    "run",
]
