"""Which condition image each control of a ``control`` run reads: one image shared by every control (the data's
``conditioning_image``), or, with ``data.conditioning_columns``, a column of its own per control, paired in the order
of the config's methods (the second ControlNet of ``[controlnet, controlnet]`` is the attached ``controlnet_1``)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from ..adapter import methods_of
from ..config import methods_of_config
from ..errors import ConfigError
from ..methods import METHODS

#: The per-call input the control methods read.
CONTROL_IMAGE = "control_image"


def control_methods(config: DictConfig) -> list[str]:
    """The names of the config's methods that read a condition image, in the config's order."""
    return [name for name, _ in methods_of_config(config) if CONTROL_IMAGE in METHODS.get(name).call_inputs]


def condition_columns(config: DictConfig) -> tuple[str, ...] | None:
    """``data.conditioning_columns`` checked against the run's controls before anything loads (None: the data's one
    condition column for every control).

    Raises:
        ConfigError: Columns beside a computed condition, or a number of columns that is neither one nor the number
            of controls.
    """
    columns = tuple(config.data.get("conditioning_columns") or ())
    if not columns:
        return None
    kind = config.data.conditioning
    if kind != "none":
        raise ConfigError(
            f"data.conditioning_columns reads condition images from the data; data.conditioning={kind} computes one "
            "from each image: use one of the two"
        )
    controls = control_methods(config)
    if len(columns) > 1 and len(columns) != len(controls):
        raise ConfigError(
            f"data.conditioning_columns names {len(columns)} condition columns for {len(controls)} controls "
            f"({', '.join(controls)}): give one column per control, in the method list's order, or one for all"
        )
    return columns


def per_control(model: Any, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """``vp.conditioning``'s ``control_image``: one image for every control, or a list of images each going to the
    control of its place among the attached controls (by their keys)."""
    if isinstance(images, torch.Tensor):
        return images
    keys = [method.key for method in methods_of(model) if CONTROL_IMAGE in method.call_inputs]
    return dict(zip(keys, images, strict=True))


def draw_conditions(model: Any, generator: Any, batch: int) -> None:
    """Before a pipeline call of ``batch`` samples drawn from ``generator`` (inside ``vp.conditioning``): every
    attached Flux ControlNet draws its condition's latent sample from the generator first, as
    ``FluxControlNetPipeline`` does (:meth:`FlowControl.draw`), so the call's images are that pipeline's."""
    from ..methods.flow_controlnet import FlowControl

    for method in methods_of(model):
        flow = getattr(method, "flow", None)
        if isinstance(flow, FlowControl):
            flow.draw(method.call_input("control_image"), generator, batch, f"this {method.key}")
