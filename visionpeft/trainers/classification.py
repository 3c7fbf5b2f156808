"""Image classification: model, method(s) and data from a config, trained by the shared run skeleton, tested."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

import visionpeft as vp

from ..adapter import methods_of
from ..backbones.factory import fixed_input_size
from ..backbones.libraries import library
from ..checkpoint.base_weights import frozen_weights_sha256, weights_source
from ..checkpoint.folder import save_adapter
from ..config import method_configs
from ..data import transforms as T
from ..data.fewshot import base_new_split, few_shot
from ..data.images import WorkerSafe
from ..errors import ConfigError, DataError, ModelLoadError
from ..registry import DATASETS
from ..tasks.classifier import create_classifier
from .base_to_new import class_bound, load_for_classes, tested_adapter
from .inputs import missing_inputs
from .logs import get_logger
from .loop import Loop
from .run import Setup, run_task

logger = get_logger(__name__)

#: Folder under ``train.output_dir`` of the image features methods compute once from a training set (a few-shot
#: cache), one file per weights, data and method settings.
FEATURE_CACHE = "feature_cache"
#: The data settings that decide which training images a run sees and how they are transformed.
DATA_IDENTITY = ("name", "root", "train_split", "class_split", "shots", "img_size", "augment", "options")


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


class ClassificationObjective:
    """Cross-entropy training (optional label smoothing) plus the ``regularization_loss`` of every attached method
    providing one (PromptSRC's self-regulating terms), for the logits and batch of the step; top-1 / top-5 accuracy
    with torchmetrics on ``loader``."""

    metric = "top1"

    def __init__(
        self,
        num_classes: int,
        loader: DataLoader | None,
        label_smoothing: float = 0.0,
        adapted: nn.Module | None = None,
    ) -> None:
        self.num_classes, self.loader, self.label_smoothing = num_classes, loader, label_smoothing
        methods = methods_of(adapted) if adapted is not None else []
        self.regularizers = [m for m in methods if "regularization_loss" in m.provides]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        for method in self.regularizers:
            loss = loss + method.regularization_loss(logits, batch)
        return loss

    def evaluate(self, model: nn.Module, accelerator: Accelerator, loader: DataLoader | None = None) -> dict:
        loader = loader if loader is not None else self.loader
        if loader is None:
            return {}
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


def dataset_split(config: DictConfig, split: str | None, class_split: str | None = None) -> Dataset | None:
    """``split`` of the config's dataset (None for no split), the half of its classes ``class_split`` names (base /
    new; default ``data.class_split``)."""
    if split is None:
        return None
    data = config.data
    options = dict(data.options)
    if data.name.startswith("cifar"):
        options.setdefault("download", data.download)
    dataset = DATASETS.get(data.name)(split, root=data.root, transform=None, **options)
    if not hasattr(dataset, "classes"):
        raise DataError(f"dataset '{data.name}' does not say its classes")
    part = class_split or data.class_split
    return base_new_split(dataset, part) if part else dataset


def _check_input_size(config: DictConfig, model: nn.Module) -> None:
    """A model with fixed position embeddings takes only its own input size: say so before any image reaches it."""
    fixed, size = fixed_input_size(model), config.data.img_size
    if fixed is None or fixed == (size, size):
        return
    resize = library(config.model.library).resize  # how the library builds its model for another size, if it can
    fix = resize.format(size=size) if resize else f"set data.img_size={fixed[0]}"
    raise ConfigError(
        f"data.img_size={size} does not fit model '{config.model.name}', built for {fixed[0]}x{fixed[1]} px inputs; "
        + fix
    )


def build_splits(config: DictConfig) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """The train / val / test datasets (untransformed); whatever is missing (every split, and the pretrained weights
    the model needs next) is one error (:func:`~.inputs.missing_inputs`)."""
    splits, problems = [], []
    for split in (config.data.train_split, config.data.val_split, config.data.test_split):
        try:
            splits.append(dataset_split(config, split))
        except DataError as err:
            splits.append(None)
            problems.append(str(err))
    if problems:
        raise missing_inputs(config, problems)
    return splits[0], splits[1], splits[2]


def build_experiment(config: DictConfig) -> Experiment:
    """Datasets, the model and its methods, as the config says (seeded); every missing input in one error."""
    set_seed(config.train.seed)
    train, val, test = build_splits(config)
    classes = list(train.classes)
    if len(classes) < 2:
        raise DataError(
            f"dataset '{config.data.name}' split '{config.data.train_split}' has {len(classes)} class"
            f"{'' if len(classes) == 1 else 'es'} ({', '.join(map(str, classes)) or 'none'}); "
            "classification needs at least 2"
        )
    if config.data.shots:
        train = few_shot(train, config.data.shots, seed=config.train.seed)
    try:
        model = create_classifier(config.model, len(classes), classes)
    except ModelLoadError as err:  # the data is there: the weights are what is missing
        raise missing_inputs(config, [], str(err)) from None
    _check_input_size(config, model)
    vp.attach(model, method_configs(config, {"classnames": classes}))
    train_tf, eval_tf = transform(config, model, train=True), transform(config, model, train=False)
    return Experiment(  # WorkerSafe: an unreadable item is one line even when a DataLoader worker reads it
        model,
        WorkerSafe(Transformed(train, train_tf)),
        WorkerSafe(Transformed(val, eval_tf)) if val is not None else None,
        WorkerSafe(Transformed(test, eval_tf)) if test is not None else None,
        classes,
    )


def transform(config: DictConfig, model: nn.Module, train: bool):
    """The training or evaluation transform of the config's recipe for ``model``'s input normalisation."""
    return T.build_transform(config.data.img_size, T.data_config_of(model), train=train, augment=config.data.augment)


def fit_training_set(config: DictConfig, exp: Experiment, device: torch.device) -> list[str]:
    """Lets the methods built from the training set before training (``fit_training_set``: Tip-Adapter's cache of
    few-shot features) see it, on ``device``; what they compute is cached under ``train.output_dir`` keyed by the
    frozen weights' sha256, the data settings, the seed and the class names. Returns summary lines."""
    fitting = [m for m in methods_of(exp.model) if "fit_training_set" in m.provides]
    if not fitting:
        return []
    exp.model.to(device)
    data, settings = config.data, OmegaConf.to_container(config.data)
    fields = {
        "base_weights_sha256": frozen_weights_sha256(exp.model),
        "source": weights_source(exp.model),
        "data": {key: settings[key] for key in DATA_IDENTITY},
        "seed": config.train.seed,
        "classes": exp.classes,
    }
    lines = []
    for method in fitting:
        path = method.fit_training_set(
            exp.train,
            batch_size=data.eval_batch_size,
            num_workers=data.num_workers,
            seed=config.train.seed,
            cache_root=Path(config.train.output_dir) / FEATURE_CACHE,
            cache_fields=fields,
        )
        lines.append(f"{method.name}: training-set features of {len(exp.train)} images in {path}")
    return lines


def selecting_methods(model: nn.Module) -> list[Any]:
    """The attached methods that choose settings on the validation split after training."""
    return [m for m in methods_of(model) if "select_on_validation" in m.provides]


def select_on_validation(config: DictConfig, loop: Loop, exp: Experiment, run_dir: Path) -> dict[str, Any]:
    """Lets the methods that choose settings on the validation split after training (``select_on_validation``:
    Tip-Adapter's beta / alpha search) choose them, then saves the adapter as ``best`` again; returns what each
    chose (nothing without such a method; without a validation split their settings stay, with a warning)."""
    selecting = selecting_methods(loop.unwrapped)
    if not selecting:
        return {}
    if exp.val is None:
        names = ", ".join(m.name for m in selecting)
        logger.warning(f"{names}: no validation split (data.val_split), so the settings chosen on it keep their start")
        return {}
    val_loader = loader(exp.val, config.data.eval_batch_size, config.data.num_workers)
    loop.model.eval()
    chosen = {method.name: method.select_on_validation(val_loader) for method in selecting}
    if loop.accelerator.is_main_process:
        save_adapter(loop.unwrapped, run_dir / "best")
    loop.log({f"select/{name}/{key}": value for name, values in chosen.items() for key, value in values.items()})
    return chosen


def loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """An evaluation loader (in order, nothing dropped)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        drop_last=False,
        persistent_workers=workers > 0,
    )


class ClassificationTrainer:
    """Builds the classifier and its data; after training, tests the checkpoint chosen on the validation split."""

    def build(self, config: DictConfig, accelerator: Accelerator, run_dir: Path) -> Setup:
        exp = build_experiment(config)
        fitted = fit_training_set(config, exp, accelerator.device)
        data = config.data
        eval_set = exp.val if exp.val is not None else exp.test
        eval_loader = loader(eval_set, data.eval_batch_size, data.num_workers) if eval_set is not None else None
        objective = ClassificationObjective(
            len(exp.classes),
            accelerator.prepare(eval_loader) if eval_loader else None,
            config.optim.label_smoothing,
            adapted=exp.model,
        )
        sizes = {k: len(v) for k, v in (("train", exp.train), ("val", exp.val), ("test", exp.test)) if v is not None}
        summary = [f"data: {data.name}, {len(exp.classes)} classes, " + ", ".join(f"{k} {n}" for k, n in sizes.items())]
        summary += fitted
        return Setup(
            exp.model,
            exp.model,
            objective,
            exp.train,
            select_best=exp.val is not None,
            loader={"num_workers": data.num_workers},
            summary=summary,
            state={"experiment": exp},
        )

    def finish(self, config: DictConfig, loop: Loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        results = self.test(config, loop, setup, run_dir)
        if config.data.class_split == "base":
            results.update(test_new_classes(config, loop, setup.state["experiment"], run_dir))
        return results

    def test(self, config: DictConfig, loop: Loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        """Tests the checkpoint chosen on the validation split (after the methods that choose on it have)."""
        exp: Experiment = setup.state["experiment"]
        if exp.test is None and not selecting_methods(loop.unwrapped):
            return {}
        if exp.val is not None and (run_dir / "best").exists():
            vp.load_adapter(loop.unwrapped, run_dir / "best")  # test the checkpoint chosen on val
        chosen = select_on_validation(config, loop, exp, run_dir)
        results: dict[str, Any] = {"selected": chosen} if chosen else {}
        if exp.test is None:
            return results
        data = config.data
        test_loader = loop.accelerator.prepare(loader(exp.test, data.eval_batch_size, data.num_workers))
        loop.model.eval()
        with torch.no_grad():
            test = setup.objective.evaluate(loop.model, loop.accelerator, test_loader)
        loop.log({f"test/{k}": v for k, v in test.items()})
        return {**results, "test": test}


def test_new_classes(config: DictConfig, loop: Loop, exp: Experiment, run_dir: Path) -> dict[str, Any]:
    """Base-to-new: the adapter the run was tested with, loaded for the new half of the classes, tested on their
    images of the split the base half was tested on (``data.test_split``, else ``data.val_split``); ``test_new``
    metrics, or nothing (with the reason logged) when the model cannot classify classes it was not trained on."""
    split = config.data.test_split or config.data.val_split
    reason = class_bound(loop.unwrapped) if split else "the config has no test or val split"
    if reason:
        logger.warning(f"base-to-new: no new-class test ({reason})")
        return {}
    new = dataset_split(config, split, class_split="new")
    classes = list(new.classes)
    model = create_classifier(config.model, len(classes), classes)
    model = load_for_classes(model, tested_adapter(run_dir, exp.val is not None), classes).to(loop.accelerator.device)
    data = config.data
    images = WorkerSafe(Transformed(new, transform(config, model, train=False)))
    test_loader = loop.accelerator.prepare(loader(images, data.eval_batch_size, data.num_workers))
    with torch.no_grad():
        test = ClassificationObjective(len(classes), None).evaluate(model, loop.accelerator, test_loader)
    loop.log({f"test_new/{k}": v for k, v in test.items()})
    return {"test_new": test}


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Trains and evaluates (see :func:`~.run.run_task` for the options); returns ``eval`` / ``test`` metrics."""
    return run_task(ClassificationTrainer(), config, run_dir, **options)
