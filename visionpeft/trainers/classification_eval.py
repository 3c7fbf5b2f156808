"""A saved classification run: evaluated again (top-1 / top-5 on a split) and applied to new images (the top-k
classes with their probabilities, one CSV row per image)."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

import visionpeft as vp

from ..config import methods_of_config
from ..data import transforms as T
from ..data.images import WorkerSafe, load_rgb
from ..errors import ConfigError
from .classification import ClassificationObjective, Experiment, Transformed, build_experiment, dataset_split, loader
from .loop import LoopConfig, make_accelerator
from .saved_run import EvalRequest, PredictRequest, adapter_dir, check_outputs, device_of, output_folder, write_new

#: classes per image in ``predict``'s CSV unless ``--top-k`` says otherwise
TOP_K = 5


def load_classifier(config: DictConfig, adapter: Path, check_base: bool) -> Experiment:
    """The run's model and data rebuilt from its config (same pretrained weights), with the saved adapter loaded
    in place of the config's methods (a warning when it holds other methods)."""
    exp = build_experiment(config)
    vp.detach(exp.model)  # a plain model: the checkpoint brings its own methods
    vp.load_adapter(exp.model, adapter, check_base=check_base)
    loaded = [m for m, _ in vp.attached_methods(exp.model)]
    configured = [m for m, _ in methods_of_config(config)]
    if loaded != configured:
        print(
            f"warning: {adapter} holds {' + '.join(loaded) or 'no method'}, not the run config's "
            f"{' + '.join(configured)}; evaluating what was loaded",
            file=sys.stderr,
        )
    return exp


def eval_transform(config: DictConfig, model: torch.nn.Module):
    """The run's evaluation transform (its image size, the model's normalisation)."""
    return T.build_transform(config.data.img_size, T.data_config_of(model), train=False, augment=config.data.augment)


def evaluate(config: DictConfig, request: EvalRequest) -> list[str]:
    """Top-1 / top-5 accuracy and the loss of the saved adapter on ``request.split`` (default: the test split)."""
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    exp = load_classifier(config, adapter, request.check_base)
    split = request.split or config.data.test_split
    dataset = exp.test if split == config.data.test_split else None
    if dataset is None:
        dataset = WorkerSafe(Transformed(dataset_split(config, split), eval_transform(config, exp.model)))
    accelerator = make_accelerator(LoopConfig(), cpu=request.cpu)
    data_loader = accelerator.prepare(
        loader(dataset, request.batch_size or config.data.eval_batch_size, config.data.num_workers)
    )
    model = accelerator.prepare(exp.model).eval()
    with torch.no_grad():
        metrics = ClassificationObjective(len(exp.classes), data_loader).evaluate(model, accelerator)
    shown = ", ".join(f"{k} {100 * v:.2f}%" if k != "loss" else f"{k} {v:.4f}" for k, v in metrics.items())
    return [f"{request.run_dir} [{adapter.name}] {split}: {shown}"]


def predict(config: DictConfig, request: PredictRequest) -> list[str]:
    """Writes ``request.out`` (a CSV file): per image its ``top_k`` classes and their probabilities."""
    if not request.inputs:
        raise ConfigError("give one or more image files to classify")
    out = request.out
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; a classification run writes one CSV file (e.g. --out labels.csv)")
    paths = [Path(p) for p in request.inputs]
    check_outputs([out], paths, request.overwrite)
    output_folder(out.parent)
    images = [load_rgb(path) for path in paths]  # every image checked before the model loads
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    exp = load_classifier(config, adapter, request.check_base)
    device = device_of(request.cpu)
    model = exp.model.to(device).eval()
    transform, batch = eval_transform(config, model), request.batch_size or config.data.eval_batch_size
    k = min(request.top_k or TOP_K, len(exp.classes))
    rows = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.stack([transform(image) for image in images[start : start + batch]]).to(device)
            top = model(x).float().softmax(-1).topk(k)
            for path, probs, ids in zip(paths[start : start + batch], top.values.tolist(), top.indices.tolist()):
                cells = [(str(exp.classes[i]), f"{p:.6f}") for i, p in zip(ids, probs)]
                rows.append([str(path), *(cell for pair in cells for cell in pair)])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image", *(f"{name}_{r}" for r in range(1, k + 1) for name in ("label", "probability"))])
    writer.writerows(rows)
    write_new(out, text.getvalue().encode(), request.overwrite)
    return [f"wrote the top-{k} classes of {len(paths)} image(s) to {out} ({adapter.name} adapter)"]
