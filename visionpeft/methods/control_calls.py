"""What the control methods (ControlNet, ControlNet-LoRA, T2I-Adapter, the Flux / SD3 ControlNet) share about a
call: the condition image fitted to the latent grid and repeated for a guidance-doubled batch, and residuals added
to what another control already passed."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DataError, IncompatibleMethodError


def fit_control_image(image, sample: torch.Tensor, factor: int, channels: int, dtype: torch.dtype, who: str):
    """A call's condition image checked against the latent grid (``factor`` x the latents' size, ``channels``),
    repeated for a batch that classifier-free guidance doubled, moved to the latents' device in ``dtype``."""
    expected = (sample.shape[-2] * factor, sample.shape[-1] * factor)
    if (
        not isinstance(image, torch.Tensor)
        or image.ndim != 4
        or tuple(image.shape[-2:]) != expected
        or (image.shape[1] != channels)
    ):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DataError(
            f"the control image has shape {shape}; {who} needs (batch, {channels}, {expected[0]}, {expected[1]}) "
            f"for latents of {tuple(sample.shape[-2:])}"
        )
    return repeat_for_batch(image, sample.shape[0]).to(device=sample.device, dtype=dtype)


def repeat_for_batch(image: torch.Tensor, batch: int) -> torch.Tensor:
    """Condition images repeated for a batch of ``batch`` (one per prompt, a batch classifier-free guidance
    doubled)."""
    if image.shape[0] != batch:
        if batch % image.shape[0]:
            raise DataError(f"{image.shape[0]} control images for a batch of {batch}")
        image = image.repeat(batch // image.shape[0], 1, 1, 1)
    return image


def add_to_call(kwargs: dict[str, Any], key: str, states: list[torch.Tensor], who: str) -> dict[str, Any]:
    """New U-Net keyword arguments with ``states`` added to whatever another control already put under ``key``
    (two controls at once); a new list, since the U-Net pops from it."""
    kwargs = dict(kwargs)
    previous = kwargs.get(key)
    if previous is not None:
        if len(previous) != len(states):
            raise IncompatibleMethodError(f"another control gave {len(previous)} {key}; {who} gives {len(states)}")
        states = [a + b for a, b in zip(previous, states)]
    kwargs[key] = list(states)
    return kwargs
