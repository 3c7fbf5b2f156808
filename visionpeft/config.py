"""Experiment configs: dataclass defaults <- YAML files (with ``_base_`` inheritance) <- ``key=value`` overrides.

The schema is a tree of dataclasses; OmegaConf merges and type-checks against it. Every mistake becomes a
:class:`ConfigError` naming the key: an unknown key (with the closest known one), a value of the wrong type, a
missing or unreadable file. Method options are checked against each method's own config dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import ConfigError, did_you_mean


@dataclass
class ModelConfig:
    """Attributes:
    library: ``timm`` or ``open_clip``.
    name: Model name (timm: ``vit_base_patch16_224.augreg_in21k``; open_clip: ``ViT-B-32``).
    pretrained: Load pretrained weights (timm tag / open_clip ``pretrained`` tag below).
    checkpoint: A local weights file (.safetensors, .pth, .bin) used instead of downloading.
    pretrained_tag: open_clip's pretrained tag (e.g. ``openai``).
    img_size: Input size override (timm), None for the model's own.
    drop_path_rate: Stochastic depth (timm).
    clip_head: For open_clip: ``linear`` (head initialised from class-name text embeddings) or ``prompts``
        (class text features: zero-shot templates or an attached CoOp / CoCoOp).
    kwargs: Extra keyword arguments for ``timm.create_model`` (architecture overrides such as ``embed_dim``).
    """

    library: str = "timm"
    name: str = "vit_base_patch16_224.augreg_in21k"
    pretrained: bool = True
    checkpoint: str | None = None
    pretrained_tag: str | None = None
    img_size: int | None = None
    drop_path_rate: float = 0.0
    clip_head: str = "linear"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Attributes:
    name: A registered dataset (``cifar10``, ``cifar100``, ``imagefolder``, ``vtab-<task>``, ...).
    root: Where the data lives (or goes, with ``download``).
    download: Let torchvision download when ``root`` lacks the files.
    train_split / val_split / test_split: Split names passed to the dataset (None skips that split).
    batch_size: Images per optimizer step (the recipe's batch), whatever the hardware: each of P processes
        loads ``batch_size / (P * optim.grad_accum)`` images per micro-batch.
    eval_batch_size: Batch size for evaluation, per process.
    num_workers: DataLoader workers.
    img_size: Input resolution.
    augment: ``none`` (resize only, the VTAB protocol) or ``crop_flip`` (random resized crop + flip).
    shots: Few-shot: this many training images per class (None for all).
    class_split: ``base`` or ``new`` half of the classes (CoCoOp's base-to-new protocol), None for all.
    options: Extra keyword arguments for the dataset builder.
    """

    name: str = "cifar100"
    root: str | None = None
    download: bool = False
    train_split: str = "train"
    val_split: str | None = None
    test_split: str | None = "test"
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 2
    img_size: int = 224
    augment: str = "none"
    shots: int | None = None
    class_split: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Attributes:
    name: ``sgd`` or ``adamw``.
    lr: Base learning rate (for ``batch_size``; see ``lr_scale_batch``).
    lr_scale_batch: If set, lr is scaled by ``batch_size / lr_scale_batch`` (VPT's linear scaling rule).
    weight_decay / momentum: Optimizer settings.
    epochs / warmup_epochs: Schedule length; linear warmup then cosine decay to ``min_lr``.
    label_smoothing: Cross-entropy label smoothing.
    grad_accum: Micro-batches accumulated per optimizer step (``data.batch_size`` stays the batch per step).
    clip_grad: Max gradient norm (None: no clipping).
    """

    name: str = "sgd"
    lr: float = 0.1
    lr_scale_batch: int | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 100
    warmup_epochs: int = 10
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    grad_accum: int = 1
    clip_grad: float | None = None


@dataclass
class RunSettings:
    """The ``train`` settings every trainer has.

    Attributes:
        seed: Seed of everything (data order, init, dropout, noise).
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (accelerate).
        output_dir: Parent of run folders. run_name: The run folder's name (default: the config file's stem).
        log_every: Log the training loss every N optimizer steps.
    """

    seed: int = 0
    mixed_precision: str = "no"
    output_dir: str = "runs"
    run_name: str | None = None
    log_every: int = 10


@dataclass
class TrainConfig(RunSettings):
    """Classification run settings (see :class:`RunSettings`); eval_every: evaluate every N epochs (and after the
    last)."""

    eval_every: int = 1


@dataclass
class ExperimentConfig:
    """A classification experiment: model, method(s), data, optimizer, training loop."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = "linear"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Reads a YAML file, merging its ``_base_`` files (paths relative to it) underneath."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path} includes itself through _base_")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    bases = data.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, _read_yaml(path.parent / base, (*seen, path)))
    return _deep_merge(merged, data)


ATOMIC_KEYS = ("method",)  # replaced whole by a later file or override: options of one method never leak into another


def _deep_merge(base: dict, top: dict, atomic: tuple[str, ...] = ATOMIC_KEYS) -> dict:
    out = dict(base)
    for key, value in top.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and key not in atomic
        out[key] = _deep_merge(out[key], value, ()) if nested else value
    return out


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            keys.append(f"{prefix}{key}")
            keys += _schema_keys(node._get_node(key), f"{prefix}{key}.")
    return keys


def _translate(err: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        known = _schema_keys(schema)
        return ConfigError(f"unknown config key '{key}' in {source}{did_you_mean(key, known)}")
    if isinstance(err, ValidationError):
        value = getattr(err, "msg", str(err)).splitlines()[0]
        return ConfigError(f"config key '{key}' in {source} has the wrong type: {value}")
    return ConfigError(f"invalid config ({source}): {str(err).splitlines()[0]}")


def normalize_methods(method: Any) -> list[tuple[str, dict[str, Any]]]:
    """``"vpt"``, ``{name: vpt, num_tokens: 10}`` or a list of those -> ``[(name, options)]``, validated."""
    from .methods import make_config

    entries = method if isinstance(method, (list, tuple)) else [method]
    out = []
    for entry in entries:
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            options = {k: v for k, v in entry.items() if k != "name"}
            name = entry["name"]
        else:
            raise ConfigError(f"config key 'method' must be a method name or {{name: ..., options}}, got {entry!r}")
        make_config(name, options)
        out.append((name, options))
    if not out:
        raise ConfigError("config key 'method' is empty")
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None, schema_class: type = None) -> DictConfig:
    """Builds the resolved, validated config: dataclass defaults <- YAML (with ``_base_``) <- overrides.

    Args:
        path: The YAML file (None: defaults and overrides only).
        overrides: ``key=value`` strings (dotted keys).
        schema_class: The dataclass tree to validate against (default: :class:`ExperimentConfig`).
    """
    schema = OmegaConf.structured(schema_class or ExperimentConfig)
    config = schema
    if path is not None:
        try:
            config = OmegaConf.merge(config, OmegaConf.create(_read_yaml(Path(path))))
        except OmegaConfBaseException as err:
            raise _translate(err, schema, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        try:
            top = OmegaConf.from_dotlist([item])
            if item.split("=", 1)[0].strip() in ATOMIC_KEYS:
                config = OmegaConf.merge(config, {"method": None})
            config = OmegaConf.merge(config, top)
        except OmegaConfBaseException as err:
            raise _translate(err, schema, f"override '{item}'") from None
    method = config.method
    plain = OmegaConf.to_container(method) if isinstance(method, (DictConfig, ListConfig)) else method
    normalize_methods(plain)
    if config.train.run_name is None and path is not None:
        config.train.run_name = Path(path).stem
    if config.train.mixed_precision == "False":  # YAML reads a bare `no` as false; accelerate's spelling is "no"
        config.train.mixed_precision = "no"
    _check_choices(config)
    OmegaConf.set_readonly(config, True)
    return config


def _check_choices(config: DictConfig) -> None:
    choices = {
        "model.library": ("timm", "open_clip"),
        "model.clip_head": ("linear", "prompts"),
        "data.augment": ("none", "crop_flip"),
        "data.class_split": (None, "base", "new"),
        "data.class_init": ("normal", "keep"),
        "optim.name": ("sgd", "adamw"),
        "train.mixed_precision": ("no", "fp16", "bf16"),
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(config, key, default="<absent>")
        if value != "<absent>" and value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    at_least = {
        "data.batch_size": 1,
        "data.eval_batch_size": 1,
        "data.num_workers": 0,
        "data.img_size": 1,
        "data.shots": 1,
        "optim.lr": 0,
        "optim.weight_decay": 0,
        "optim.epochs": 1,
        "optim.warmup_epochs": 0,
        "optim.grad_accum": 1,
        "optim.clip_grad": 0,
        "optim.label_smoothing": 0,
        "train.eval_every": 1,
        "train.log_every": 1,
        "train.ema_decay": 0,
        # the diffusion trainers' keys
        "data.size": 1,
        "data.repeats": 1,
        "optim.steps": 1,
        "optim.batch_size": 1,
        "train.validation_every": 1,
        "train.validation_images": 1,
        "train.class_dropout": 0,
    }
    for key, low in at_least.items():
        value = OmegaConf.select(config, key, default=None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise ConfigError(f"config key '{key}' must be at least {low}, got {value!r}")
    epochs, warmup = (OmegaConf.select(config, f"optim.{k}", default=None) for k in ("epochs", "warmup_epochs"))
    if isinstance(epochs, int) and isinstance(warmup, int) and warmup > epochs:
        raise ConfigError(
            f"optim.warmup_epochs ({warmup}) exceeds optim.epochs ({epochs}), so the learning rate would never reach "
            "its peak; lower optim.warmup_epochs too"
        )
    decay = OmegaConf.select(config, "train.ema_decay", default=None)
    if isinstance(decay, float) and decay > 1:
        raise ConfigError(f"config key 'train.ema_decay' must be at most 1, got {decay!r}")
    smoothing = OmegaConf.select(config, "optim.label_smoothing", default=None)
    if isinstance(smoothing, float) and smoothing >= 1:
        raise ConfigError(f"config key 'optim.label_smoothing' must be below 1, got {smoothing!r}")


def save_config(config: DictConfig, path: Path) -> None:
    """Writes the resolved config (what the run really used) as YAML."""
    from .io import atomic_write

    text = OmegaConf.to_yaml(config)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def methods_of_config(config: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    method = config.method
    return normalize_methods(OmegaConf.to_container(method) if isinstance(method, (DictConfig, ListConfig)) else method)
