"""A saved class-conditional run: samples of each class drawn again with the trained adapter (a grid, one row per
class), and samples of named classes x seeds. Sampling is the trainer's own (:meth:`ClassValidation.draw`); the
class names and their label ids come from the run's dataset, as in training."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..errors import ConfigError, did_you_mean
from .class_conditional import ClassValidation, labelled_dataset
from .saved_run import (
    EvalRequest,
    PredictRequest,
    adapted_pipeline,
    adapter_dir,
    check_outputs,
    eval_folder,
    output_folder,
    png_bytes,
    readable_grid,
    slug,
    write_new,
)


def _sampler(config: DictConfig, adapter: Path, cpu: bool, check_base: bool):
    """(the trainer's validation around the run's DiT pipeline with ``adapter`` loaded, an accelerator)."""
    pipeline, accelerator = adapted_pipeline(config.model, adapter, cpu, check_base)
    return ClassValidation(pipeline, config, adapter.parent, []), accelerator


def _label_ids(config: DictConfig, names: list[str]) -> tuple[list[str], list[int]]:
    """(the chosen class names: ``names``, else the run's validation classes, else all; their label ids)."""
    classes = [str(c) for c in labelled_dataset(config).classes]
    chosen = names or list(config.train.validation_classes) or classes
    for name in chosen:
        if name not in classes:
            raise ConfigError(
                f"'{name}' is not a class of the run{did_you_mean(name, classes)}; its classes: {', '.join(classes)}"
            )
    return chosen, [classes.index(name) for name in chosen]


def evaluate(config: DictConfig, request: EvalRequest) -> list[str]:
    """Writes ``grid.png``: ``--samples`` images (default ``train.validation_images``) of each validation class (all
    classes when the run names none), one row per class."""
    chosen, label_ids = _label_ids(config, [])
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    validation, accelerator = _sampler(config, adapter, request.cpu, request.check_base)
    per_class = request.samples or config.train.validation_images
    images = validation.draw(accelerator, label_ids, per_class)
    out = eval_folder(request, adapter.name)
    readable_grid([images[i : i + per_class] for i in range(0, len(images), per_class)]).save(out / "grid.png")
    return [
        f"{request.run_dir} [{adapter.name}] {per_class} sample(s) of each of {len(chosen)} classes: "
        f"{out / 'grid.png'} (rows: {', '.join(chosen)})"
    ]


def predict(config: DictConfig, request: PredictRequest) -> list[str]:
    """One image per (class name, seed) into ``request.out``: ``<class>_seedS.png``."""
    chosen, label_ids = _label_ids(config, list(request.inputs))
    seeds = request.seeds or [config.train.seed]
    out = output_folder(request.out)
    names = [(name, label, seed) for name, label in zip(chosen, label_ids) for seed in seeds]
    paths = [out / f"{slug(name)}_seed{seed}.png" for name, _, seed in names]
    check_outputs(paths, [], request.overwrite)
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    validation, accelerator = _sampler(config, adapter, request.cpu, request.check_base)
    for (_, label, seed), path in zip(names, paths):
        write_new(path, png_bytes(validation.draw(accelerator, [label], 1, seed)[0]), request.overwrite)
    return [f"wrote {len(paths)} image(s) ({len(chosen)} class(es) x {len(seeds)} seed(s)) to {out} ({adapter.name})"]
