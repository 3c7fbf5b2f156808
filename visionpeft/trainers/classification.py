"""Image classification: build model, method(s) and data from a config, train with the shared loop, evaluate."""

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
from torchmetrics.classification import MulticlassAccuracy

import visionpeft as vp

from ..backbones.factory import create_model
from ..config import methods_of_config, save_config
from ..data import transforms as T
from ..data.fewshot import base_new_split, few_shot
from ..errors import ConfigError, DataError
from ..registry import DATASETS, TRAINERS
from .loop import Loop, LoopConfig, make_accelerator


class Transformed(Dataset):
    """Applies a transform to the images of a dataset built without one."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), int(label)


class ClassificationTask:
    """Cross-entropy training (optional label smoothing); top-1 / top-5 accuracy with torchmetrics."""

    metric = "top1"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0) -> None:
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels, label_smoothing=self.label_smoothing)

    def evaluate(self, model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        device = accelerator.device
        metrics = {"top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro").to(device)}
        if self.num_classes >= 5:
            metrics["top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro").to(device)
        losses, count = 0.0, 0
        for images, labels in loader:
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            logits, labels, loss = accelerator.gather_for_metrics((logits, labels, loss.reshape(1)))
            for metric in metrics.values():
                metric.update(logits.float(), labels)
            losses += float(loss.sum())
            count += labels.numel()
        out = {name: float(metric.compute()) for name, metric in metrics.items()}
        out["loss"] = losses / max(1, count)
        return out


@dataclass
class Experiment:
    """Everything built from a config, before training."""

    model: nn.Module
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]


def _dataset(config: DictConfig, split: str | None) -> Dataset | None:
    if split is None:
        return None
    data = config.data
    options = dict(data.options)
    if data.name.startswith("cifar"):
        options.setdefault("download", data.download)
    dataset = DATASETS.get(data.name)(split, root=data.root, transform=None, **options)
    if not hasattr(dataset, "classes"):
        raise DataError(f"dataset '{data.name}' does not say its classes")
    return base_new_split(dataset, data.class_split) if data.class_split else dataset


def build_experiment(config: DictConfig) -> Experiment:
    """Datasets, the model and its methods, as the config says (seeded)."""
    set_seed(config.train.seed)
    train = _dataset(config, config.data.train_split)
    classes = list(train.classes)
    if config.data.shots:
        train = few_shot(train, config.data.shots, seed=config.train.seed)
    model = create_model(config.model, len(classes), classes)
    methods = []
    for name, options in methods_of_config(config):
        if name in ("coop", "cocoop") and "classnames" not in options:
            options = {**options, "classnames": classes}
        methods.append((name, options))
    vp.attach(model, methods)
    mean, std = T.normalization_of(model)
    size, augment = config.data.img_size, config.data.augment
    train_tf = T.build_transform(size, mean, std, train=True, augment=augment)
    eval_tf = T.build_transform(size, mean, std, train=False, augment=augment)
    val, test = _dataset(config, config.data.val_split), _dataset(config, config.data.test_split)
    return Experiment(
        model,
        Transformed(train, train_tf),
        Transformed(val, eval_tf) if val is not None else None,
        Transformed(test, eval_tf) if test is not None else None,
        classes,
    )


def build_optimizer(config: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters only; biases and norms without weight decay."""
    optim = config.optim
    lr = optim.lr * (config.data.batch_size / optim.lr_scale_batch if optim.lr_scale_batch else 1.0)
    decay, no_decay = [], []
    for name, param in vp.trainable_parameters(model):
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the method leaves nothing to train")
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        persistent_workers=workers > 0,
    )


def parameter_summary(model: nn.Module) -> str:
    counts = vp.count_parameters(model)
    lines = [
        f"total parameters:     {counts['total']:>14,}",
        f"trainable parameters: {counts['trainable']:>14,} ({100 * counts['trainable'] / counts['total']:.3f}%)",
    ]
    lines += [f"  {group:<20}{n:>14,}" for group, n in counts["by_group"].items()]
    return "\n".join(lines)


@TRAINERS.register("classification")
def run(
    config: DictConfig, run_dir: Path, resume: bool = False, dry_run: bool = False, stop_after: int | None = None,
    cpu: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Trains and evaluates; returns the final metrics (``val``/``test`` dicts)."""
    loop_cfg = LoopConfig(
        epochs=config.optim.epochs,
        warmup_epochs=config.optim.warmup_epochs,
        min_lr_ratio=config.optim.min_lr / config.optim.lr if config.optim.lr else 0.0,
        grad_accum=config.optim.grad_accum,
        clip_grad=config.optim.clip_grad,
        mixed_precision=config.train.mixed_precision,
        seed=config.train.seed,
        log_every=config.train.log_every,
        eval_every=config.train.eval_every,
    )
    accelerator = make_accelerator(loop_cfg, cpu=cpu)
    exp = build_experiment(config)
    if accelerator.is_main_process:
        print(parameter_summary(exp.model))
    if dry_run:
        sizes = {k: len(v) for k, v in (("train", exp.train), ("val", exp.val), ("test", exp.test)) if v is not None}
        print(
            f"data: {config.data.name}, {len(exp.classes)} classes, " + ", ".join(f"{k} {n}" for k, n in sizes.items())
        )
        return {}
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process and not resume:
        save_config(config, run_dir / "config.yaml")
    # data.batch_size is the recipe's batch per optimizer step, whatever the hardware: each process loads
    # batch_size / (processes x grad_accum) images per micro-batch.
    shards = accelerator.num_processes * config.optim.grad_accum
    per_process = config.data.batch_size // shards
    if per_process * shards != config.data.batch_size:
        raise ConfigError(
            f"data.batch_size {config.data.batch_size} is not divisible by {accelerator.num_processes} process(es) "
            f"x optim.grad_accum {config.optim.grad_accum}"
        )
    seed = config.train.seed
    data = config.data
    train_loader = loader(exp.train, per_process, data.num_workers, True, seed)
    eval_set = exp.val if exp.val is not None else exp.test
    eval_loader = loader(eval_set, data.eval_batch_size, data.num_workers, False, seed) if eval_set else None
    task = ClassificationTask(len(exp.classes), config.optim.label_smoothing)
    optimizer = build_optimizer(config, exp.model)
    loop = Loop(exp.model, task, optimizer, train_loader, eval_loader, run_dir, loop_cfg, accelerator,
                select_best=exp.val is not None)  # fmt: skip
    if resume:
        loop.load_state()
    last = loop.fit(stop_after=stop_after)
    results: dict[str, Any] = {"eval": last, "parameters": vp.count_parameters(loop.unwrapped)}
    if loop.epoch >= config.optim.epochs and exp.test is not None:
        if exp.val is not None and (run_dir / "best").exists():
            vp.load_adapter(loop.unwrapped, run_dir / "best")  # test the checkpoint chosen on val
        test_loader = accelerator.prepare(loader(exp.test, data.eval_batch_size, data.num_workers, False, seed))
        results["test"] = loop.evaluate(test_loader)
        if accelerator.is_main_process:
            loop._log({"epoch": loop.epoch, "step": loop.step, **{f"test/{k}": v for k, v in results["test"].items()}})
            print(
                f"test: top1 {100 * results['test']['top1']:.2f}%"
                + (f", top5 {100 * results['test']['top5']:.2f}%" if "top5" in results["test"] else "")
            )
    accelerator.end_training()
    return results
