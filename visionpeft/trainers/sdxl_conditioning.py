"""Stable Diffusion XL's conditioning: both text encoders and the U-Net's added conditions.

As diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (at 58eb52c) computes them:

- prompts (``tokenize_prompt`` / ``encode_prompt``, lines 943-980): each tokenizer pads to its
  ``model_max_length`` with its own pad token (SDXL's second tokenizer pads with ``"!"``); each encoder runs with
  ``output_hidden_states=True`` and gives its penultimate hidden states, joined along the width (CLIP ViT-L's 768 +
  OpenCLIP ViT-bigG's 1280 = 2048 in SDXL); the pooled embedding is the last encoder's first output
  (``CLIPTextModelWithProjection.text_embeds``);
- added conditions (``compute_time_ids``, lines 1477-1483, and the U-Net call, lines 1727-1773):
  ``{"text_embeds": pooled, "time_ids": original size + crop top-left + target size}``, six numbers per item in
  the U-Net's dtype. The data items carry the real crop (:mod:`visionpeft.data.buckets`, lines 825-838 of the
  script); without them (a control pair set) an item counts as uncropped at its own size, as
  ``train_controlnet_sdxl.py`` does with its default ``--crops_coords_top_left_h/w 0``.

The control trainer's SDXL U-Net takes the same added conditions: :func:`time_ids` and
:meth:`SDXLPromptEncoder.denoiser_inputs` are what it needs.
"""

from __future__ import annotations

import torch

from ..data.buckets import MICRO_CONDITIONS
from .prompt_encoders import EncodedPrompts, PromptEncoder, device_of, token_ids


def time_ids(
    conditions: dict[str, torch.Tensor] | None,
    batch: int,
    image_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """SDXL's (batch, 6) time ids: original (height, width), crop (top, left), target (height, width).

    Args:
        conditions: ``original_size``, ``crop_top_left`` and ``target_size`` as (batch, 2) tensors (what the data
            items carry), or None: every item uncropped at ``image_size``.
        batch: Items in the batch.
        image_size: (height, width) of the training images.
    """
    if conditions is None:
        size = torch.tensor(image_size)
        parts = [size, torch.zeros(2, dtype=torch.long), size]
        return torch.cat(parts).repeat(batch, 1).to(device, dtype)
    missing = [key for key in MICRO_CONDITIONS if key not in conditions]
    if missing:
        raise ValueError(f"SDXL's time ids need {', '.join(MICRO_CONDITIONS)}; the batch lacks {', '.join(missing)}")
    return torch.cat([conditions[key].reshape(batch, 2) for key in MICRO_CONDITIONS], dim=1).to(device, dtype)


class SDXLPromptEncoder(PromptEncoder):
    """SDXL: both encoders' penultimate hidden states joined, encoder 2's pooled embedding and the time ids as the
    U-Net's ``added_cond_kwargs`` (see the module docstring)."""

    @classmethod
    def matches(cls, pipeline) -> bool:
        unet = getattr(pipeline, "unet", None)
        return (
            getattr(pipeline, "text_encoder_2", None) is not None
            and unet is not None
            and unet.config.get("addition_embed_type") == "text_time"
        )

    def encode(self, prompts: list[str]) -> EncodedPrompts:
        pipe = self.pipeline
        hidden, pooled = [], None
        for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
            outputs = encoder(
                token_ids(tokenizer, prompts, device_of(encoder)), output_hidden_states=True, return_dict=False
            )
            pooled = outputs[0]  # only the last encoder's counts
            hidden.append(outputs[-1][-2])
        return EncodedPrompts(torch.cat(hidden, dim=-1), pooled.reshape(pooled.shape[0], -1))

    def denoiser_inputs(
        self, encoded: EncodedPrompts, conditions: dict[str, torch.Tensor] | None, image_size: tuple[int, int]
    ) -> dict:
        unet = self.pipeline.unet
        batch = encoded.hidden.shape[0]
        ids = time_ids(conditions, batch, image_size, encoded.hidden.device, unet.dtype)
        return {"added_cond_kwargs": {"text_embeds": encoded.pooled.to(unet.dtype), "time_ids": ids}}

    def vae_in_fp32(self, vae) -> bool:
        """SDXL's VAE overflows in fp16: its config says ``force_upcast`` (the fp16-fix VAE's says false)."""
        return bool(vae.config.get("force_upcast", True))
