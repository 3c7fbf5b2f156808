"""timm's entry in the library table: models built with ``timm.create_model`` from a name with its tag (weights
from the Hugging Face hub) or a local file, their data config (``timm.data.resolve_data_config``) and the fixed input
size of a patch embedding with ``strict_img_size``. The model families are described by ``timm_vit.py`` and
``timm_eva.py``."""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, ModelLoadError, VisionPEFTError, did_you_mean
from .hub import offline_unless_reachable
from .libraries import DataConfig
from .weights_files import load_state, read_state_dict


def load_timm_weights(model: nn.Module, path: str | Path) -> None:
    """Loads a local timm checkpoint, adapting position embeddings and dropping a head of another size."""
    if Path(path).suffix == ".npz":  # original JAX ViT checkpoints
        model.load_pretrained(str(path))
        return
    state = read_state_dict(path)
    filter_fn = getattr(__import__(type(model).__module__, fromlist=["x"]), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    load_state(model, state, path, head="head.")


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


def create(cfg: Any, num_classes: int) -> nn.Module:
    """The timm model of ``cfg`` (the ``model`` section) with a ``num_classes`` classifier (0: features only)."""
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


def data_config(model: nn.Module) -> DataConfig:
    """``timm.data.resolve_data_config`` of the model's ``pretrained_cfg`` (an in21k ViT: mean = std = 0.5, its
    ``crop_pct``, bicubic); a model built without one (a class called directly) gets the defaults."""
    if not getattr(model, "pretrained_cfg", None):
        return DataConfig()
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return DataConfig(tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"], cfg["interpolation"])


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (height, width) of a patch embedding that accepts only its own size (timm's ``strict_img_size``: fixed
    position embeddings, no ``dynamic_img_size``), else None."""
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None)
    return tuple(size) if size is not None and getattr(patch, "strict_img_size", False) else None
