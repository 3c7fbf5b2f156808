"""The text side and denoiser call of the flow-matching families, Flux and Stable Diffusion 3, as diffusers'
DreamBooth-LoRA scripts compute them (``examples/dreambooth/train_dreambooth_lora_flux.py`` and
``train_dreambooth_lora_sd3.py`` at 58eb52c):

- Flux (``encode_prompt``, flux lines 943-1072): the pooled output of CLIP-L (``pooler_output``, 77 tokens) and the
  last hidden states of T5 (``--max_sequence_length`` tokens, default 512); text ids are zeros (tokens, 3). The
  transformer reads the latents packed 2 x 2 (``FluxPipeline._pack_latents``) with image ids
  (``_prepare_latent_image_ids`` at half the latent size), the timestep divided by 1000 and, when it has a guidance
  embedding (FLUX.1-dev), ``--guidance_scale`` (default 3.5) per item; its output is unpacked (lines 1744-1800).
- SD3 (``encode_prompt``, sd3 lines 935-1061): both CLIP encoders' penultimate hidden states joined along the width and
  zero-padded to T5's width, then T5's last hidden states (``--max_sequence_length``, default 77) appended along the
  tokens; the pooled embedding is both CLIP encoders' ``text_embeds`` joined. The transformer reads the latents and
  the timesteps as they are (lines 1800-1806).

The objective (:mod:`.flow_matching`) is the same for both; the family defaults of its knobs are the scripts': Flux
``--weighting_scheme none``, no preconditioning; SD3 ``logit_normal`` with ``--precondition_outputs 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.diffusers_flow import flow_family
from ..backbones.diffusers_loading import T5_COMPONENTS
from ..config.diffusion_objective import DiffusionObjective
from ..errors import ConfigError
from .prompt_encoders import EncodedPrompts, PromptEncoder, device_of, token_ids

#: the Flux script's ``--guidance_scale`` default (FLUX.1-dev is guidance distilled)
FLUX_GUIDANCE = 3.5


@dataclass
class FlowKnobs:
    """The flow objective's settings with the family's defaults filled in (see :class:`DiffusionObjective`)."""

    weighting_scheme: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    precondition_outputs: bool
    guidance_scale: float | None
    max_sequence_length: int


class FlowPromptEncoder(PromptEncoder):
    """What Flux and SD3 share: T5 beside CLIP, the knobs of the flow objective, the latent normalisation with the
    VAE's shift and scale. Subclasses encode and call their transformer."""

    loss_kind = "flow"
    #: ``flux`` / ``sd3``
    family = ""
    #: the script's ``--max_sequence_length``, ``--weighting_scheme`` and ``--precondition_outputs`` defaults
    default_max_sequence_length = 512
    default_weighting = "none"
    default_precondition = False

    def __init__(self, pipeline, objective: DiffusionObjective | None = None) -> None:
        super().__init__(pipeline, objective)
        knobs = objective or DiffusionObjective()
        guidance = knobs.guidance_scale
        if guidance is None and self.has_guidance():
            guidance = FLUX_GUIDANCE
        self.knobs = FlowKnobs(
            knobs.weighting_scheme or self.default_weighting,
            knobs.logit_mean,
            knobs.logit_std,
            knobs.mode_scale,
            self.default_precondition if knobs.precondition_outputs is None else knobs.precondition_outputs,
            guidance,
            knobs.max_sequence_length or self.default_max_sequence_length,
        )

    @classmethod
    def matches(cls, pipeline) -> bool:
        return flow_family(getattr(pipeline, "transformer", None)) == cls.family

    def has_guidance(self) -> bool:
        """The transformer takes a guidance input (a guidance embedding: FLUX.1-dev)."""
        return bool(self.pipeline.transformer.config.get("guidance_embeds", False))

    @property
    def t5(self) -> str:
        """The component holding T5."""
        return T5_COMPONENTS[self.family]

    def check_pipeline(self, model: str) -> None:
        """The pipeline has what the family's conditioning reads, and the knobs fit it.

        Raises:
            ConfigError: No T5 encoder or tokenizer, or a guidance scale for a transformer without a guidance
                embedding, in one line.
        """
        pipe = self.pipeline
        tokenizer = self.t5.replace("text_encoder", "tokenizer")
        if not isinstance(getattr(pipe, self.t5, None), nn.Module) or getattr(pipe, tokenizer, None) is None:
            raise ConfigError(
                f"{model} has no T5 text encoder ({self.t5} / {tokenizer}): {type(pipe).__name__} conditions on "
                "T5's hidden states; use a folder that holds it"
            )
        if self.knobs.guidance_scale is not None and not self.has_guidance():
            raise ConfigError(
                f"optim.guidance_scale={self.knobs.guidance_scale}: {model}'s transformer has no guidance embedding "
                "(only guidance-distilled models such as FLUX.1-dev take one); unset optim.guidance_scale"
            )

    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels: the VAE's downscaling times the transformer's patch
        (Flux: its 2 x 2 packing)."""
        vae = 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)
        return vae * self.patch()

    def patch(self) -> int:
        return 2

    def t5_states(self, prompts: list[str]) -> torch.Tensor:
        """T5's last hidden states (``_encode_prompt_with_t5``): padded to ``max_sequence_length``, truncated."""
        encoder = getattr(self.pipeline, self.t5)
        tokenizer = getattr(self.pipeline, self.t5.replace("text_encoder", "tokenizer"))
        ids = token_ids(tokenizer, prompts, device_of(encoder), self.knobs.max_sequence_length)
        return encoder(ids)[0]

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """``(latents - shift_factor) * scaling_factor`` (both scripts' line ``model_input = ...``)."""
        config = self.pipeline.vae.config
        return (latents - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, encoded: EncodedPrompts
    ) -> torch.Tensor:
        """The transformer's output for the noisy latents (batch, channels, h, w), in the latents' layout."""
        raise NotImplementedError


class FluxPromptEncoder(FlowPromptEncoder):
    """Flux: CLIP-L pooled + T5 states; packed latents, ids and guidance (see the module docstring)."""

    family = "flux"

    def encode(self, prompts: list[str]) -> EncodedPrompts:
        clip = self.pipeline.text_encoder
        pooled = clip(token_ids(self.pipeline.tokenizer, prompts, device_of(clip)), output_hidden_states=False)
        return EncodedPrompts(self.t5_states(prompts), pooled.pooler_output)

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, encoded: EncodedPrompts
    ) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        dtype = denoiser.dtype
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, dtype)
        text_ids = torch.zeros(encoded.hidden.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = None
        if self.has_guidance():
            guidance = torch.tensor([self.knobs.guidance_scale], device=noisy.device).expand(batch)
        packed = FluxPipeline._pack_latents(noisy.to(dtype), batch, channels, height, width)
        output = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=encoded.pooled.to(dtype),
            encoder_hidden_states=encoded.hidden.to(dtype),
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)
        return FluxPipeline._unpack_latents(output, height * scale, width * scale, scale)


class SD3PromptEncoder(FlowPromptEncoder):
    """Stable Diffusion 3 / 3.5: CLIP-L + CLIP-G penultimate states (zero-padded to T5's width) followed by T5's
    states; both CLIP encoders' pooled embeddings joined (see the module docstring)."""

    family = "sd3"
    default_max_sequence_length = 77
    default_weighting = "logit_normal"
    default_precondition = True

    def patch(self) -> int:
        return self.pipeline.transformer.config.patch_size

    def vae_in_fp32(self, vae: nn.Module) -> bool:
        """The SD3 script keeps its VAE in fp32 (``vae.to(accelerator.device, dtype=torch.float32)``, line 1237)."""
        return True

    def encode(self, prompts: list[str]) -> EncodedPrompts:
        pipe = self.pipeline
        states, pooled = [], []
        for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
            outputs = encoder(token_ids(tokenizer, prompts, device_of(encoder)), output_hidden_states=True)
            pooled.append(outputs[0])
            states.append(outputs.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        t5 = self.t5_states(prompts)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return EncodedPrompts(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, encoded: EncodedPrompts
    ) -> torch.Tensor:
        dtype = denoiser.dtype
        return denoiser(
            hidden_states=noisy.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=encoded.hidden.to(dtype),
            pooled_projections=encoded.pooled.to(dtype),
            return_dict=False,
        )[0]
