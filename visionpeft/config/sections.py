"""The config sections every task shares: ``optim`` (optimizer, run length and schedule) and ``train`` (run
settings). Tasks subclass them to change defaults or add task-specific fields; the names mean the same thing in
every task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backbones.libraries import IMAGE_LIBRARIES
from ..errors import ConfigError
from ..schema import setting

#: Learning-rate schedules (built by transformers' ``get_scheduler``); warmup is linear from 0 in every one.
SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
#: Optimizers ``build_optimizer`` makes; prodigy needs the ``prodigyopt`` package, adamw8bit ``bitsandbytes``
#: (checked when the config loads: :data:`EXTRA_PACKAGES`).
OPTIMIZERS = ("sgd", "adamw", "prodigy", "adamw8bit")
#: ``train.base_storage``: the frozen layers' weights in 8 bits under the adapters (``trainers/base_storage.py``).
BASE_STORAGES = ("none", "fp8", "int8")
#: (section, field, value) -> the package that setting needs (an extra: one line naming its install when missing).
EXTRA_PACKAGES = {("optim", "name", "adamw8bit"): "bitsandbytes", ("train", "base_storage", "int8"): "torchao"}


#: The ``task:`` field's help, shared by every task schema.
TASK_HELP = (
    "the trainer: classification, segmentation, personalization, class_conditional, control, ip_adapter, "
    "pretrain_text_to_image, pretrain_clip"
)


@dataclass
class VisionModel:
    """``model``: the image tasks' backbone, built by a library of the table in ``visionpeft/backbones/libraries.py``
    (a timm ViT, an open_clip CLIP, a transformers model, any torch module)."""

    library: str = setting("timm", "model library (visionpeft/backbones/libraries.py)", choices=IMAGE_LIBRARIES)
    name: str = setting(
        "vit_base_patch16_224.augreg_in21k",
        "timm model name (with tag), open_clip architecture, transformers id / folder, or package.module:function",
    )
    pretrained: bool = setting(True, "load pretrained weights (timm tag / open_clip pretrained_tag)")
    checkpoint: str | None = setting(None, "a local weights file (.safetensors, .pth, .bin) used instead", path="file")
    pretrained_tag: str | None = setting(None, "open_clip's pretrained tag (e.g. openai)")
    img_size: int | None = setting(None, "input size override (timm); null: the model's own", min=1)
    drop_path_rate: float = setting(0.0, "stochastic depth (timm)", min=0, below=1)
    kwargs: dict[str, Any] = setting({}, "extra timm.create_model arguments (e.g. embed_dim, dynamic_img_size)")


@dataclass
class OptimConfig:
    """Optimizer, run length and learning-rate schedule. The run is counted in optimizer steps: ``epochs`` (whole
    passes over the training set) or ``steps``, exactly one of them; warmup likewise in ``warmup_epochs`` or
    ``warmup_steps``."""

    name: str = setting(
        "adamw",
        "optimizer: sgd, adamw, prodigy (Mishchenko & Defazio 2024, pip install prodigyopt: estimates the step "
        "size; lr is its multiplier, 1.0 as in diffusers' examples) or adamw8bit (bitsandbytes' AdamW8bit, "
        "diffusers' --use_8bit_adam: 8-bit optimizer states; pip install bitsandbytes)",
        choices=OPTIMIZERS,
    )
    lr: float = setting(1e-3, "peak learning rate (see lr_scale_batch)", min=0)
    lr_scale_batch: int | None = setting(
        None, "if set, lr is multiplied by data.batch_size / lr_scale_batch (linear scaling rule)", min=1
    )
    weight_decay: float = setting(0.0, "weight decay (AdamW: decoupled)", min=0)
    bias_decay: bool = setting(False, "apply weight decay to biases and norm weights (1-D tensors) too")
    momentum: float = setting(0.9, "SGD momentum", min=0, max=1)
    schedule: str = setting("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    epochs: int | None = setting(None, "run length in passes over the training set (or set steps)", min=1)
    steps: int | None = setting(None, "run length in optimizer steps (or set epochs)", min=1)
    warmup_epochs: int | None = setting(None, "linear warmup from 0, in epochs (or set warmup_steps)", min=0)
    warmup_steps: int | None = setting(None, "linear warmup from 0, in optimizer steps (or warmup_epochs)", min=0)
    min_lr: float = setting(0.0, "learning rate at the end of cosine / polynomial decay", min=0)
    power: float = setting(1.0, "power of the polynomial schedule (mmseg's poly: 1.0 or 0.9)", min=0)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", min=1)
    clip_grad: float | None = setting(None, "max gradient norm (null: no clipping)", min=0)
    loraplus_lr_ratio: float | None = setting(
        None,
        "LoRA+ (Hayou et al. 2024): LoRA B matrices and 1-D tensors learn at lr x this ratio, as PEFT's "
        "create_loraplus_optimizer (the LoRA+ README asks for >= 1, task dependent; 2^4 = 16 is the usual "
        "choice); null: off",
        above=0,
    )
    train_fraction: dict[str, float] = setting(
        {},
        "method name -> share of the run's optimizer steps its tensors train, their learning rate 0 after that "
        "(pivotal tuning: {textual_inversion: 0.5}, diffusers' --train_text_encoder_ti_frac)",
    )


def check_optimizer_config(config) -> None:
    """The optimizer's package must be importable before anything is built, and ``optim.train_fraction``'s shares
    lie in (0, 1].

    Raises:
        ConfigError: ``optim.name=prodigy`` without the ``prodigyopt`` package, in one line naming the install; a
            share outside (0, 1].
    """
    import importlib.util

    if config.optim.get("name") == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise ConfigError("optim.name=prodigy needs the prodigyopt package: pip install prodigyopt")
    for name, share in (config.optim.get("train_fraction") or {}).items():
        if not 0 < share <= 1:
            raise ConfigError(f"optim.train_fraction.{name} must lie in (0, 1], got {share}")


def check_extra_packages(config) -> None:
    """Each setting of :data:`EXTRA_PACKAGES` that the config chooses must find its package before anything is
    built.

    Raises:
        ConfigError: The package is missing, in one line naming the install.
    """
    import importlib.util

    for (section, field, value), package in EXTRA_PACKAGES.items():
        chosen = (config.get(section) or {}).get(field)
        if chosen == value and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{section}.{field}={value} needs the {package} package: pip install {package}")


@dataclass
class RunSettings:
    """The ``train`` settings every task has."""

    seed: int = setting(0, "seed of everything: data order, initialisation, dropout, noise", min=0, max=2**32 - 1)
    mixed_precision: str = setting("no", "accelerate mixed precision", choices=PRECISIONS)
    output_dir: str = setting("runs", "parent folder of run folders", path=True)
    run_name: str | None = setting(None, "the run folder's name (default: the config file's stem)")
    log_every: int = setting(10, "log the training loss every N optimizer steps", min=1)
    eval_every: int | None = setting(
        None,
        "evaluate / validate every N epochs (epoch runs) or N optimizer steps (step runs), and at the end",
        min=1,
    )
    ema_decay: float | None = setting(
        None, "keep an EMA of the trained weights (evaluation and the saved files use it); null: none", min=0, max=1
    )
    license: str | None = setting(None, "license in the run's model card metadata (the base model's terms apply)")
    checkpoint_every: int | None = setting(
        None, "also save the resumable state every N optimizer steps (+ RUN/checkpoints/step-N adapters)", min=1
    )
    checkpoints_total_limit: int | None = setting(None, "keep only the newest N step checkpoints", min=1)
    base_storage: str = setting(
        "none",
        "the frozen layers' weights under the adapters: none, fp8 (float8_e4m3fn, upcast per layer in its forward) "
        "or int8 (torchao int8 weight-only, pip install torchao)",
        choices=BASE_STORAGES,
    )
    report_to: str = setting(
        "tensorboard",
        "experiment tracker (accelerate's): scalars and validation images",
        choices=("tensorboard", "wandb", "none"),
    )


@dataclass
class DiffusionTrain(RunSettings):
    """The ``train`` settings of the diffusion tasks."""

    eval_every: int | None = setting(500, "validate every N optimizer steps (and at the end)", min=1)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass")
    validation_images: int = setting(2, "images per validation prompt / class", min=1)
    validation_steps: int = setting(25, "sampling steps of validation images", min=1)


@dataclass
class TextToImageTrain(DiffusionTrain):
    """The ``train`` settings of the text-to-image tasks (Stable Diffusion pipelines)."""

    guidance_rescale: float = setting(
        0.0,
        "rescale classifier-free guidance in validation samples (the pipelines' guidance_rescale, Lin et al. 2024; "
        "0.7 with optim.rescale_zero_terminal_snr; 0: off)",
        min=0,
        max=1,
    )


@dataclass
class DiffusersModel:
    """``model``: a diffusers pipeline."""

    name: str = setting(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "hub id or local folder of the pipeline", path="or_id"
    )
