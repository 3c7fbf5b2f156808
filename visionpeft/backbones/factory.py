"""Model creation for the trainers: timm models and open_clip models from a pretrained tag or a local file.

Downloads go through the libraries' own loaders (timm / open_clip pretrained tags on the Hugging Face hub). When
they fail (no network, unknown tag) the error is one line saying how to point at a local file instead.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError, VisionPEFTError, did_you_mean
from .hub import offline_unless_reachable


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a weights file: safetensors, or a PyTorch pickle loaded with ``weights_only=True`` (never arbitrary
    objects). Nested ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints are unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign files: one line, whatever the loader raised
        raise ModelLoadError(f"cannot read checkpoint {path}: {str(err).splitlines()[0][:160]}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def load_timm_weights(model: nn.Module, path: str | Path) -> None:
    """Loads a local timm checkpoint, adapting position embeddings and dropping a head of another size."""
    if Path(path).suffix == ".npz":  # original JAX ViT checkpoints
        model.load_pretrained(str(path))
        return
    state = read_state_dict(path)
    filter_fn = getattr(__import__(type(model).__module__, fromlist=["x"]), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    head = {k for k in state if k.startswith("head.") and (k not in own or own[k].shape != state[k].shape)}
    state = {k: v for k, v in state.items() if k not in head}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = (missing or unexpected or shapes)[:3]
        raise ModelLoadError(f"checkpoint {path} does not fit {type(model).__name__}: e.g. {', '.join(detail)}")


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def _timm_arguments(name: str) -> list[str]:
    """Keyword arguments of the model classes in the module defining timm model ``name`` (for suggestions)."""
    import timm

    module = sys.modules[timm.models.model_entrypoint(name.split(".")[0]).__module__]
    names: set[str] = set()
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__:
            params = inspect.signature(obj.__init__).parameters
            if "num_classes" in params:
                names.update(p for p in params if p != "self")
    return sorted(names)


def _timm_create(name: str, pretrained: bool, kwargs: dict[str, Any], user_keys: Iterable[str]) -> nn.Module:
    """``timm.create_model``; an argument of ``model.kwargs`` the model class does not take is a ConfigError."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        match = _UNEXPECTED.search(str(err))
        if match is None or match.group(1) not in user_keys:
            raise
        key = match.group(1)
        raise ConfigError(
            f"model.kwargs.{key} is not an argument of timm model '{name}'{did_you_mean(key, _timm_arguments(name))}"
        ) from None


def create_timm(cfg: Any, num_classes: int) -> nn.Module:
    import timm

    base = cfg.name.split(".")[0]
    if not timm.is_model(base):
        raise ConfigError(f"unknown timm model '{cfg.name}'{did_you_mean(base, timm.list_models())}")
    kwargs: dict[str, Any] = {**cfg.kwargs, "num_classes": num_classes, "drop_path_rate": cfg.drop_path_rate}
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    user_keys = list(cfg.kwargs)
    if cfg.checkpoint:
        model = _timm_create(cfg.name, False, kwargs, user_keys)
        load_timm_weights(model, cfg.checkpoint)
        return model
    if not cfg.pretrained:
        return _timm_create(cfg.name, False, kwargs, user_keys)
    with offline_unless_reachable() as online:
        try:
            return _timm_create(cfg.name, True, kwargs, user_keys)
        except VisionPEFTError:
            raise
        except Exception as err:  # hub / network failures of any kind
            reason = str(err).splitlines()[0][:120] if online else "no network, and not in the local cache"
            raise ModelLoadError(
                f"could not fetch pretrained weights for '{cfg.name}' ({reason}); download them elsewhere and set "
                "model.checkpoint=/path/to/weights.safetensors, or model.pretrained=false"
            ) from None


def create_open_clip(cfg: Any) -> nn.Module:
    import open_clip

    if cfg.name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model '{cfg.name}'{did_you_mean(cfg.name, open_clip.list_models())}")
    pretrained = cfg.checkpoint or (cfg.pretrained_tag if cfg.pretrained else None)
    if cfg.checkpoint and not Path(cfg.checkpoint).expanduser().is_file():
        raise ModelLoadError(f"checkpoint {cfg.checkpoint} does not exist")
    with offline_unless_reachable() as online:
        try:
            model = open_clip.create_model(cfg.name, pretrained=pretrained)
        except Exception as err:
            reason = str(err).splitlines()[0][:120] if online or cfg.checkpoint else "no network, not in the cache"
            raise ModelLoadError(
                f"could not load open_clip '{cfg.name}' with pretrained={pretrained!r} ({reason}); "
                "set model.checkpoint=/path/to/open_clip_weights.bin"
            ) from None
        try:  # the model's own tokenizer (CLIP BPE ships with open_clip; SigLIP's comes from the hub)
            model.__dict__["_visionpeft_tokenizer"] = open_clip.get_tokenizer(cfg.name)
        except Exception as err:
            reason = str(err).splitlines()[0][:120] if online else "no network, not in the cache"
            raise ModelLoadError(f"could not load the tokenizer of open_clip '{cfg.name}' ({reason})") from None
    return model


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (height, width) a classifier from :func:`create_model` requires, or None when it takes any size (a timm
    model built with ``dynamic_img_size``)."""
    inner = model.inner_model() if hasattr(model, "inner_model") else model
    visual = getattr(inner, "visual", inner)
    trunk = getattr(visual, "trunk", visual)  # open_clip's TimmModel keeps the timm model as its trunk
    patch = getattr(trunk, "patch_embed", None)
    if patch is not None:
        size = getattr(patch, "img_size", None)
        return tuple(size) if size is not None and getattr(patch, "strict_img_size", False) else None
    size = getattr(visual, "image_size", None)  # open_clip's VisionTransformer: fixed position embeddings
    if size is not None and hasattr(visual, "positional_embedding"):
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return None


def _recipe_head(model: nn.Module, norm: str, init_std: float | None) -> None:
    """The classifier as a recipe asks: ``trunc_normal(init_std)`` weights and zero bias (MoCo v3 / AdaptFormer's
    ``main_image.py``), a ``BatchNorm1d(affine=False, eps=1e-6)`` in front (``norm="batchnorm"``, the same file)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        if norm != "none" or init_std is not None:
            raise ConfigError(
                f"model.head_norm / model.head_init_std need a linear classifier 'head'; "
                f"{type(model).__name__} has {type(head).__name__}"
            )
        return
    if init_std is not None:
        from timm.layers import trunc_normal_

        trunc_normal_(head.weight, std=init_std)
        nn.init.zeros_(head.bias)
    if norm == "batchnorm":
        model.head = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)


def create_model(cfg: Any, num_classes: int, classnames: list[str] | None = None) -> nn.Module:
    """The classifier of an experiment (``cfg`` is the ``model`` section of the config).

    open_clip models become a :class:`CLIPClassifier` over ``classnames``: with a linear head initialised from the
    class-name text embeddings (``clip_head: linear``) or classifying by class text features (``prompts``).
    """
    if cfg.checkpoint:
        source = str(Path(cfg.checkpoint).expanduser().resolve())
    elif not cfg.pretrained:
        source = f"{cfg.name} (random init)"
    else:
        source = f"timm/{cfg.name}" if cfg.library == "timm" else f"{cfg.name}/{cfg.pretrained_tag}"  # hub ids
    head_norm, head_init_std = getattr(cfg, "head_norm", "none"), getattr(cfg, "head_init_std", None)
    if cfg.library != "timm" and (head_norm != "none" or head_init_std is not None):
        raise ConfigError(
            "model.head_norm / model.head_init_std apply to timm classifiers; an open_clip "
            "classifier's head starts from the class-name text embeddings"
        )
    if cfg.library == "timm":
        model = create_timm(cfg, num_classes)
        _recipe_head(model, head_norm, head_init_std)
    else:
        from ..tasks.clip_classifier import CLIPClassifier

        clip = create_open_clip(cfg)
        if not classnames:
            raise ConfigError("an open_clip classifier needs the dataset's class names")
        model = CLIPClassifier(clip, classnames, head=cfg.clip_head == "linear")
    model.__dict__["_visionpeft_source"] = source  # what adapter checkpoints and model cards name as the base
    return model
