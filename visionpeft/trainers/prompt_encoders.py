"""What a prompt batch becomes for a pipeline's denoiser, one encoder object per pipeline family.

A family's :class:`PromptEncoder` turns prompts into :class:`EncodedPrompts` (the states the denoiser
cross-attends to, and whatever else its text side gives) and says which further inputs the denoiser takes per call
(:meth:`PromptEncoder.denoiser_inputs`: SDXL's added conditions). :func:`~.diffusion.diffusion_loss` and the
trainers ask these two methods only, so a new family (SD 3, Flux) adds one encoder class and its entry in
:data:`~.diffusion.PROMPT_ENCODERS`, no branch in the loss or the trainers.

This module holds the shared tokenization and the Stable Diffusion 1.x / 2.x encoder (the text encoder's last
hidden states, as diffusers' ``train_text_to_image.py`` / ``train_dreambooth_lora.py`` use them);
:mod:`.sdxl_conditioning` holds SDXL's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EncodedPrompts:
    """The text side of one prompt batch.

    Attributes:
        hidden: The states the denoiser cross-attends to, (batch, tokens, width).
        pooled: A pooled embedding per prompt when the family uses one (SDXL's ``text_embeds``), else None.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def requires_grad(self) -> bool:
        """Something trainable fed these tensors (then they cannot be cached)."""
        return any(t is not None and t.requires_grad for t in (self.hidden, self.pooled))


def expand_placeholders(prompts: list[str], tokenizer) -> list[str]:
    """Writes multi-vector textual-inversion tokens out (``<t>`` -> ``<t> <t>_1 <t>_2``) with diffusers' own
    ``maybe_convert_prompt`` (what its pipelines do at inference), so training sees the prompts inference sees."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    return TextualInversionLoaderMixin().maybe_convert_prompt(list(prompts), tokenizer)


def token_ids(tokenizer, prompts: list[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
    """The prompts' token ids padded to ``max_length`` (default: the tokenizer's ``model_max_length``) with its own
    pad token (diffusers' ``tokenize_prompt``: ``padding="max_length"``, truncated), placeholders written out first."""
    return tokenizer(
        expand_placeholders(prompts, tokenizer),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class PromptEncoder:
    """Stable Diffusion 1.x / 2.x: the text encoder's last hidden states; the U-Net takes nothing else.

    The encoder reads the pipeline's components when called, so a tokenizer that textual inversion grew (or gave
    back) is the one used. ``loss_kind`` names the family's objective: ``ddpm`` (:func:`~.diffusion.diffusion_loss`'s
    noise / velocity prediction) or ``flow`` (:mod:`.flow_matching`).
    """

    loss_kind = "ddpm"

    def __init__(self, pipeline, objective=None) -> None:
        self.pipeline = pipeline

    def check_pipeline(self, model: str) -> None:
        """Raises ``ConfigError`` in one line when the pipeline lacks what the family's conditioning reads (Stable
        Diffusion: nothing to check)."""

    @classmethod
    def matches(cls, pipeline) -> bool:
        """Whether this encoder is the one for ``pipeline``."""
        return isinstance(getattr(pipeline, "text_encoder", None), nn.Module)

    def encode(self, prompts: list[str]) -> EncodedPrompts:
        encoder = self.pipeline.text_encoder
        ids = token_ids(self.pipeline.tokenizer, prompts, device_of(encoder))
        return EncodedPrompts(encoder(ids)[0])

    def denoiser_inputs(
        self, encoded: EncodedPrompts, conditions: dict[str, torch.Tensor] | None, image_size: tuple[int, int]
    ) -> dict:
        """Keyword arguments of the denoiser's call beyond (latents, timesteps, hidden states): none here.

        Args:
            encoded: This batch's prompts.
            conditions: Per-item data conditions (SDXL's ``original_size`` / ``crop_top_left`` / ``target_size``
                as (batch, 2) tensors), or None.
            image_size: (height, width) of the training images.
        """
        return {}

    def vae_in_fp32(self, vae: nn.Module) -> bool:
        """Whether the family's VAE must stay in fp32 under mixed precision (SD 1.x / 2.x: no)."""
        return False
