"""Visual prompting in pixel space (Bahng et al. 2022, "Exploring Visual Prompts for Adapting Large-Scale Models";
official code hjbahng/visual_prompting ``models/prompters.py`` at commit 679e71f).

A learned image-sized perturbation is added to every input image, after its resize, crop and normalisation (the
official ``main_clip.py`` / ``main_vision.py`` run the prompter on the preprocessed batch), and the frozen model reads
the sum. Styles (the official ``--method``): ``padding`` (``PadPrompter``: a frame ``prompt_size`` pixels wide, zero
inside), ``fixed_patch`` (a ``prompt_size`` square at the top-left corner) and ``random_patch`` (the same square at a
position drawn anew at every call, training and evaluation alike, from torch's generator where the official code
draws it with NumPy). Every value starts from a standard normal, as the official ``torch.randn``.

It works on any image model: on a ViT-style tower (timm ViT / EVA, open_clip's visual tower) the pad is added to the
image the patch embedding receives; on a model without described blocks (a CNN through the generic family) to the
model's first input. The image size is the model's fixed input size, or ``image_size`` for a model taking any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.factory import fixed_input_size
from ..errors import ConfigError, DataError, IncompatibleMethodError
from ..schema import setting
from .base import Method, MethodConfig, register_method

STYLES = ("padding", "fixed_patch", "random_patch")


@dataclass
class VisualPromptingConfig(MethodConfig):
    """Visual prompting options; defaults are the official code's (``main_clip.py``: ``--method padding``,
    ``--prompt_size 30``, ``--image_size 224``). At 224 x 224 the pad trains 2 x 3 x 30 x 224 + 2 x 3 x (224 - 60)
    x 30 = 69,840 parameters; a patch 3 x 30 x 30 = 2,700.

    Attributes:
        style: ``padding`` (a frame), ``fixed_patch`` (the top-left square), ``random_patch`` (a square anywhere).
        prompt_size: Width of the frame, or side of the square, in pixels.
        image_size: Side of the (square) images, for a model that takes any size; null: the model's fixed size.
    """

    style: str = setting(
        "padding", "padding: a frame around the image; fixed_patch / random_patch: a square", choices=STYLES
    )
    prompt_size: int = setting(30, "frame width or square side in pixels", min=1)
    image_size: int | None = setting(
        None, "image side for a model taking any size; null: the model's fixed size", min=1
    )


class PadPrompt(nn.Module):
    """A frame ``size`` pixels wide around ``(channels, height, width)`` images, zero inside; the official
    ``PadPrompter``'s parameters (names and shapes), so its checkpoints load as they are."""

    def __init__(self, channels: int, height: int, width: int, size: int) -> None:
        super().__init__()
        inner = height - 2 * size
        self.pad_up = nn.Parameter(torch.randn(1, channels, size, width))
        self.pad_down = nn.Parameter(torch.randn(1, channels, size, width))
        self.pad_left = nn.Parameter(torch.randn(1, channels, inner, size))
        self.pad_right = nn.Parameter(torch.randn(1, channels, inner, size))

    def prompt(self) -> torch.Tensor:
        """The (1, channels, height, width) image added to every input."""
        left, right = self.pad_left, self.pad_right
        middle = left.new_zeros(1, left.shape[1], left.shape[2], self.pad_up.shape[3] - 2 * left.shape[3])
        return torch.cat([self.pad_up, torch.cat([left, middle, right], dim=3), self.pad_down], dim=2)


class PatchPrompt(nn.Module):
    """A ``size`` x ``size`` square added at the top-left corner (``FixedPatchPrompter``) or at a random position
    drawn at every call (``RandomPatchPrompter``)."""

    def __init__(self, channels: int, height: int, width: int, size: int, random: bool) -> None:
        super().__init__()
        self.height, self.width, self.random = height, width, random
        self.patch = nn.Parameter(torch.randn(1, channels, size, size))

    def prompt(self) -> torch.Tensor:
        size = self.patch.shape[-1]
        top = left = 0
        if self.random:  # np.random.choice(isize - psize) in the official code: 0 .. isize - psize - 1
            top = int(torch.randint(self.height - size, ()))
            left = int(torch.randint(self.width - size, ()))
        pads = (left, self.width - size - left, top, self.height - size - top)
        return nn.functional.pad(self.patch, pads)


@register_method
class VisualPrompting(Method):
    name = "vp"
    config_class = VisualPromptingConfig
    frozen_eval = True  # the official scripts keep the model in eval mode and train the prompter only

    def image_input(self) -> nn.Module:
        """The module whose first input is the image: a token tower's patch embedding, or the model itself when
        the backbone describes it without blocks.

        Raises:
            IncompatibleMethodError: The tower reads no images (a text tower, a U-Net or DiT on latents).
        """
        tower = self.tower
        if tower.tokens is not None and "embed" in tower.stages:
            return tower.stages["embed"]
        if not tower.blocks and not tower.stages:
            return self.backbone.inner
        raise IncompatibleMethodError(
            f"vp adds a learned pad to the images a model reads; the {self.backbone.family} '{tower.name}' tower "
            "reads no images"
        )

    def image_size(self) -> tuple[int, int]:
        """The (height, width) the prompt is learned for: the model's fixed input size, or ``image_size``."""
        fixed = fixed_input_size(self.backbone.model)
        given = self.config.image_size
        if given is not None and fixed is not None and (given, given) != tuple(fixed):
            raise ConfigError(
                f"vp image_size={given}, but the model takes only {fixed[0]}x{fixed[1]} images; leave image_size out"
            )
        if given is not None:
            return given, given
        if fixed is None:
            raise ConfigError("vp needs the image size of a model that takes any size: set its option image_size")
        return int(fixed[0]), int(fixed[1])

    def check_fits(self) -> None:
        super().check_fits()
        self.image_input()
        height, width = self.image_size()
        size, style = self.config.prompt_size, self.config.style
        if style == "padding" and 2 * size >= min(height, width):
            raise ConfigError(
                f"vp's pad of prompt_size {size} on each side leaves nothing of {height}x{width} images; "
                f"2 x prompt_size must be below {min(height, width)}"
            )
        if style != "padding" and size >= min(height, width):
            raise ConfigError(
                f"vp's {style} of prompt_size {size} does not fit in {height}x{width} images; "
                f"prompt_size must be below {min(height, width)}"
            )

    def build(self) -> None:
        cfg = self.config
        entry = self.image_input()
        height, width = self.image_size()
        channels = self.tower.tokens.in_chans if self.tower.tokens is not None else 3
        if cfg.style == "padding":
            prompt = PadPrompt(channels, height, width, cfg.prompt_size)
        else:
            prompt = PatchPrompt(channels, height, width, cfg.prompt_size, random=cfg.style == "random_patch")
        self.prompt = self.add_module(entry, f"{self.tower.prefix}vp", prompt)
        self.expected = (channels, height, width)
        self.hook_input(entry, self._add_prompt)

    def _add_prompt(self, module: nn.Module, args: tuple) -> tuple:
        images = args[0] if args else None
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.expected:
            shape = "x".join(map(str, images.shape[1:])) if isinstance(images, torch.Tensor) else "no image tensor"
            raise DataError(
                f"vp's prompt is learned for {'x'.join(map(str, self.expected))} images (channels x height x width); "
                f"the model got {shape}"
            )
        return (images + self.prompt.prompt().to(images.dtype), *args[1:])
