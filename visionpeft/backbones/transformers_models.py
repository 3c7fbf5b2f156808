"""Hugging Face transformers' entry in the library table: image models from a hub id or a ``save_pretrained``
folder (``AutoModelForImageClassification`` with a ``num_classes`` classifier, ``AutoModel`` for features), read
the way their image processor reads images. Methods adapt them by module path (``generic.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..errors import ModelLoadError, VisionPEFTError
from .generic import conventional_heads
from .hub import offline_unless_reachable
from .libraries import DataConfig
from .weights_files import load_state, read_state_dict


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' loading reports and progress bars stay out of the run's output."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _processor_config(name: str) -> DataConfig:
    """The normalisation, crop and interpolation of the image processor saved with ``name``; the defaults when it
    has none."""
    from PIL import Image
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        return DataConfig()
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        return DataConfig()
    crop = getattr(processor, "crop_pct", None)
    size, crop_size = getattr(processor, "size", None) or {}, getattr(processor, "crop_size", None) or {}
    resized = size.get("shortest_edge") or size.get("height")
    if crop is None and getattr(processor, "do_center_crop", False) and resized and crop_size.get("height"):
        crop = crop_size["height"] / resized
    resample = getattr(processor, "resample", None)
    interpolation = Image.Resampling(resample).name.lower() if resample is not None else "bilinear"
    return DataConfig(tuple(mean), tuple(std), float(crop or 1.0), interpolation)


def create(cfg: Any, num_classes: int) -> nn.Module:
    """The transformers model ``cfg.name`` names: with pretrained weights (a classifier of another size starts
    fresh), from its config alone (``model.pretrained=false``) or with the weights of ``model.checkpoint``;
    ``model.kwargs`` go to its config."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    auto = AutoModelForImageClassification if num_classes else AutoModel
    options = {**cfg.kwargs, **({"num_labels": num_classes} if num_classes else {})}
    with offline_unless_reachable() as online, _quiet():
        try:
            if cfg.pretrained and not cfg.checkpoint:
                model = auto.from_pretrained(cfg.name, ignore_mismatched_sizes=bool(num_classes), **options)
            else:
                model = auto.from_config(AutoConfig.from_pretrained(cfg.name, **options))
        except VisionPEFTError:
            raise
        except Exception as err:  # hub / network / format failures of any kind
            reason = str(err).strip().splitlines()[0][:120] if online else "no network, and not in the local cache"
            raise ModelLoadError(
                f"could not load transformers model '{cfg.name}' ({reason}); set model.name to a folder written by "
                "save_pretrained"
            ) from None
        model.__dict__["_visionpeft_data_config"] = _processor_config(cfg.name)
    if cfg.checkpoint:
        head = next(iter(conventional_heads(model)), None)
        load_state(model, read_state_dict(cfg.checkpoint), cfg.checkpoint, head=f"{head}." if head else None)
    return model


def data_config(model: nn.Module) -> DataConfig:
    """What the image processor of the model's weights says (recorded when it was built here), else the
    defaults."""
    return model.__dict__.get("_visionpeft_data_config") or DataConfig()


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """None: transformers models check their input size themselves."""
    return None
