"""Class-conditional fine-tuning of a DiT pipeline on a labelled image dataset: DiffFit's setting.

DiffFit (Xie et al., ICCV 2023) adapts an ImageNet DiT-XL/2 to a new dataset (Food101, Stanford Cars, ...) by
training biases, norms, per-branch scales and the class-condition embedding. Here any diffusers ``DiTPipeline``
(hub id or local folder) trains on any dataset of the toolkit (an ImageFolder tree, CIFAR, ...) with DiT's own
objective (noise MSE + the variational-bound term for the learned variance, labels dropped to the null class with
probability 0.1 for classifier-free guidance), EMA weights, validation grids every N steps, and resumable runs.

The new dataset's classes take label ids 0..N-1 of the pretrained class table, whose size and null class (the last
row, id 1000 for ImageNet DiTs, which ``DiTPipeline`` hard-codes) stay as they are, so the merged model loads in
``DiTPipeline`` unchanged; ``data.class_init=normal`` re-initialises those N rows as DiT initialises its table
(N(0, 0.02)), ``keep`` starts from the pretrained classes' rows. Outputs: ``adapter/`` (visionpeft) and, for
methods that merge exactly, ``merged/``: a complete ``DiTPipeline`` folder whose ``id2label`` names the new classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

import visionpeft as vp

from ..adapter import backbone_of
from ..backbones.diffusers_loading import load_pipeline
from ..config import method_configs
from ..config.diffusion_objective import DiffusionObjective, objective_of
from ..errors import ConfigError, DataError, IncompatibleMethodError
from ..registry import DATASETS
from .diffusion import training_scheduler
from .diffusion_objective import check_objective
from .dit_loss import class_conditional_loss
from .run import Setup, run_task


class Labelled(Dataset):
    """(image in [-1, 1], label) pairs with DiT's preprocessing: resize the short side, centre crop, flip."""

    def __init__(self, dataset: Dataset, size: int, flip: bool) -> None:
        self.dataset = dataset
        steps = [T.RGB(), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size)]
        steps += [T.RandomHorizontalFlip()] if flip else []
        to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.5] * 3)]
        self.transform = T.Compose([*steps, *to_tensor])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


class ClassDenoiser(nn.Module):
    """The adapted transformer plus the frozen VAE, with DiT's loss as forward (what accelerate wraps)."""

    def __init__(self, pipeline, cfg: DictConfig) -> None:
        super().__init__()
        self.transformer, self.vae = pipeline.transformer, pipeline.vae
        self.objective = objective_of(cfg.optim)
        self.__dict__["scheduler"] = training_scheduler(pipeline, self.objective)
        backbone = backbone_of(pipeline.transformer)
        self.__dict__["label_embedders"] = backbone.label_embedders()
        self.null_class = backbone.class_table().num_embeddings - 1
        self.cfg = cfg

    def forward(self, batch) -> torch.Tensor:
        images, labels = batch
        for embedder in self.label_embedders:  # labels are dropped here, once per sample, not once per block
            embedder.eval()
        drop = torch.rand(labels.shape[0], device=labels.device) < self.cfg.train.class_dropout
        labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        losses = class_conditional_loss(
            self.transformer,
            self.vae,
            self.scheduler,
            images,
            labels,
            learn_sigma=self.cfg.train.learn_sigma,
            objective=self.objective,
        )
        return losses.mean()


class ClassValidation:
    """Validation instead of a metric: samples ``validation_images`` per validation class, writes one grid."""

    metric = "none"

    def __init__(self, pipeline, cfg: DictConfig, run_dir: Path, label_ids: list[int]) -> None:
        self.pipeline, self.cfg, self.run_dir, self.label_ids = pipeline, cfg, run_dir, label_ids
        self.calls = 0

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch)

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        from diffusers.utils import make_image_grid

        self.calls += 1
        if not accelerator.is_main_process or not self.label_ids:
            return {}
        per_class = self.cfg.train.validation_images
        images = self.draw(accelerator, self.label_ids, per_class)
        folder = self.run_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        make_image_grid(images, rows=len(self.label_ids), cols=per_class).save(folder / f"{self.calls:03d}.png")
        self.last_images = {"validation/samples": images}
        return {}

    def draw(self, accelerator, label_ids: list[int], per_class: int, seed: int | None = None) -> list:
        """``per_class`` images of each label id, in one batch drawn with ``seed`` (default ``train.seed``)."""
        train = self.cfg.train
        generator = torch.Generator(device="cpu").manual_seed(train.seed if seed is None else seed)
        self.pipeline.set_progress_bar_config(disable=True)
        labels = [label for label in label_ids for _ in range(per_class)]
        with accelerator.autocast():
            return self.pipeline(
                labels,
                guidance_scale=train.guidance_scale,
                generator=generator,
                num_inference_steps=train.validation_steps,
            ).images


def labelled_dataset(cfg: DictConfig) -> Dataset:
    """The run's labelled images (``data.name`` / ``data.split``), without transform; checked: classes, not empty."""
    dataset = DATASETS.get(cfg.data.name)(cfg.data.split, root=cfg.data.root, transform=None, **dict(cfg.data.options))
    if not hasattr(dataset, "classes"):
        raise DataError(f"dataset '{cfg.data.name}' does not say its classes")
    if len(dataset) == 0:
        raise DataError(f"dataset '{cfg.data.name}' split '{cfg.data.split}' is empty")
    return dataset


def check_dit_objective(objective: DiffusionObjective) -> None:
    """DiT trains epsilon prediction with its learned variance: the prediction knobs that change it are refused."""
    if objective.prediction_type == "v_prediction" or objective.rescale_zero_terminal_snr:
        field = "prediction_type=v_prediction" if objective.prediction_type else "rescale_zero_terminal_snr=true"
        raise ConfigError(
            f"optim.{field} does not apply to class_conditional: DiT predicts epsilon and its variance (L_vb) on "
            "the schedule it was trained with; leave optim.prediction_type null and rescale_zero_terminal_snr false"
        )


def _prepare_class_table(pipeline, cfg: DictConfig, classes: list[str]) -> None:
    """Checks the classes fit the pretrained table, re-initialises their rows (``class_init=normal``)."""
    backbone = backbone_of(pipeline.transformer)
    table = backbone.class_table()
    capacity = table.num_embeddings - 1
    if len(classes) > capacity:
        raise ConfigError(f"the dataset has {len(classes)} classes but the DiT's class table holds {capacity}")
    if cfg.train.guidance_scale > 1 and cfg.train.validation_classes and capacity != 1000:
        raise ConfigError(
            f"DiTPipeline uses class id 1000 as the null class for guidance, but this DiT's null class is {capacity}; "
            "set train.guidance_scale=1"
        )
    if cfg.data.class_init == "normal":
        if not table.weight.requires_grad:
            names = ", ".join(name for name, _ in vp.attached_methods(pipeline))
            raise IncompatibleMethodError(
                f"data.class_init=normal re-initialises the class rows, but {names} does not train the class "
                "table; use data.class_init=keep"
            )
        with torch.no_grad():
            table.weight[: len(classes)].normal_(0.0, 0.02)


def save_outputs(pipeline, run_dir: Path, classes: list[str]) -> list[Path]:
    """Writes the adapter and, when every method merges exactly, a complete ``DiTPipeline`` folder."""
    import copy

    written = [vp.save_adapter(pipeline.transformer, run_dir / "adapter")]
    if vp.can_merge(pipeline.transformer):
        transformer = vp.merge(copy.deepcopy(pipeline.transformer))
        merged = type(pipeline)(transformer=transformer, vae=pipeline.vae, scheduler=pipeline.scheduler)
        merged.save_pretrained(run_dir / "merged")
        index = run_dir / "merged" / "model_index.json"
        config = json.loads(index.read_text())
        config["id2label"] = {str(i): name for i, name in enumerate(classes)}  # DiTPipeline reads it back
        index.write_text(json.dumps(config, indent=2) + "\n")
        written.append(run_dir / "merged")
    return written


class ClassConditionalTrainer:
    """Checks the dataset against the DiT's class table, attaches the method(s); after training, writes the adapter
    and (exact merges) a complete ``DiTPipeline`` folder that knows the new class names."""

    def build(self, config: DictConfig, accelerator, run_dir: Path) -> Setup:
        knobs = objective_of(config.optim)
        check_dit_objective(knobs)
        dataset = labelled_dataset(config)  # fails early on a missing or corrupt dataset
        classes = list(dataset.classes)
        unknown = [c for c in config.train.validation_classes if c not in classes]
        if unknown:
            raise ConfigError(
                f"train.validation_classes {unknown} are not classes of the dataset ({', '.join(classes)})"
            )
        pipeline = load_pipeline(config.model.name)
        if not hasattr(pipeline, "transformer") or not hasattr(pipeline, "get_label_ids"):
            raise ConfigError(f"{config.model.name} is not a class-conditional DiT pipeline")
        check_objective(knobs, pipeline.scheduler, config.model.name)
        vp.attach(pipeline, method_configs(config))
        _prepare_class_table(pipeline, config, classes)
        if config.train.gradient_checkpointing:
            pipeline.transformer.enable_gradient_checkpointing()
        vae_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        size = config.data.size or pipeline.transformer.config.sample_size * vae_factor
        label_ids = [classes.index(c) for c in config.train.validation_classes]
        objective = ClassValidation(pipeline, config, run_dir, label_ids)
        images = Labelled(dataset, size, config.data.flip)
        drop_last = len(dataset) >= config.data.batch_size
        return Setup(
            ClassDenoiser(pipeline, config),
            pipeline.transformer,
            objective,
            images,
            frozen=[pipeline.transformer, pipeline.vae],
            loader={"drop_last": drop_last},
            summary=[f"{len(dataset)} images, {len(classes)} classes, {size} px"],
            state={"pipeline": pipeline, "classes": classes},
        )

    def finish(self, config: DictConfig, loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        classes = setup.state["classes"]
        if not loop.accelerator.is_main_process:
            return {"outputs": [], "classes": classes}
        return {"outputs": save_outputs(setup.state["pipeline"], run_dir, classes), "classes": classes}


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Trains (see :func:`~.run.run_task` for the options); returns ``{"outputs": [paths], "steps": n, "classes"}``."""
    return run_task(ClassConditionalTrainer(), config, run_dir, **options)
