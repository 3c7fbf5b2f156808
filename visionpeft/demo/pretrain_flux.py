"""Pretraining of the tiny Flux-layout pipeline (``model.family: flux`` of the ``pretrain_text_to_image`` task).

The VAE and the CLIP text encoder + tokenizer are ``model.base``'s (``checkpoints/tiny_sd``, frozen; the VAE gets
Flux's shift and scale from its latents of the training images), the T5 encoder and the Flux transformer are new
(:mod:`.tiny_flux_parts`) and train together with the shared loop on the flow-matching loss of Flux
(:func:`~visionpeft.trainers.flow_matching.flow_matching_loss`, the knobs of ``optim``: T5 padded to
``optim.max_sequence_length`` tokens, timesteps by ``optim.weighting_scheme``). Captions are dropped to ``""`` at
``data.caption_dropout`` so that true classifier-free guidance works. ``finish`` writes ``RUN/pipeline``, a
``FluxPipeline`` folder (fp32) that diffusers loads alone; ``tools/pretrain.py`` ships it
(:func:`~.tiny_flux_card.export_flux_pipeline`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

import visionpeft as vp

from ..backbones import pipeline_modules
from ..config.diffusion_objective import objective_of
from ..errors import ConfigError
from ..trainers.diffusion import DiffusionParts
from ..trainers.flow_conditioning import FluxPromptEncoder
from ..trainers.flow_matching import flow_matching_loss, flow_training_scheduler
from ..trainers.run import Setup
from .pretrain_sd import CaptionedPixels, PretrainTextToImageTrainer, SampleGrids, dropped_captions
from .tiny_flux_parts import (
    build_transformer,
    caption_words,
    flux_latent_normalisation,
    flux_scheduler,
    sampling_options,
    t5_encoder,
    t5_tokenizer,
)
from .tiny_sd_parts import pretraining_images, to_pixels

#: T5's sequence length when ``optim.max_sequence_length`` is unset (every caption fits: at most 8 words + ``</s>``)
DEFAULT_T5_TOKENS = 16


def t5_tokens(cfg: DictConfig) -> int:
    return cfg.optim.max_sequence_length or DEFAULT_T5_TOKENS


class FlowDenoiser(nn.Module):
    """The trained modules plus the frozen VAE; forward is the flow-matching loss of a batch."""

    def __init__(self, adapted: nn.Module, pipeline, cfg: DictConfig) -> None:
        super().__init__()
        self.adapted, self.vae = adapted, pipeline.vae
        objective = objective_of(cfg.optim)
        if objective.max_sequence_length is None:
            from dataclasses import replace

            objective = replace(objective, max_sequence_length=t5_tokens(cfg))
        parts = DiffusionParts(
            pipeline.transformer,
            pipeline.vae,
            FluxPromptEncoder(pipeline, objective),
            flow_training_scheduler(pipeline),
            None,  # T5 trains: no prompt cache
            {},  # the VAE is frozen: each image's latent distribution is computed once
        )
        self.__dict__["parts"] = parts
        self.cfg = cfg

    def forward(self, batch: dict) -> torch.Tensor:
        prompts = dropped_captions(batch["prompt"], self.cfg.data.caption_dropout)
        return flow_matching_loss(self.parts, batch["pixel_values"], prompts)


class FluxSampleGrids(SampleGrids):
    """Validation grids drawn as the shipped pipeline draws: 32 px, T5 at its trained length, true CFG."""

    def draw(self, per_prompt: int) -> list:
        from .pretrain_sd import VALIDATION_PROMPTS

        train = self.cfg.train
        self.pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(train.seed)
        prompts = [p for p in VALIDATION_PROMPTS for _ in range(per_prompt)]
        options = sampling_options(t5_tokens(self.cfg), train.guidance_scale, self.cfg.model.image_size, len(prompts))
        return self.pipeline(prompts, num_inference_steps=train.validation_steps, generator=generator, **options).images


def build_flux_pipeline(cfg: DictConfig, pixels: torch.Tensor, folder: Path):
    """``(pipeline, record)``: a ``FluxPipeline`` of ``model.base``'s VAE and CLIP with a new T5 encoder + tokenizer
    (saved into ``folder``) and a new transformer; the record holds the VAE's normalisation."""
    from diffusers import FluxPipeline, StableDiffusionPipeline

    from ..backbones.diffusers_loading import dtype_keyword

    model = cfg.model
    if not model.base or not (Path(model.base) / "model_index.json").is_file():
        raise ConfigError(
            f"model.base={model.base}: family flux reuses a pretrained tiny SD pipeline's VAE and CLIP; "
            "make checkpoints/tiny_sd first (python tools/pretrain.py configs/pretrain/tiny_sd.yaml)"
        )
    base = StableDiffusionPipeline.from_pretrained(model.base, local_files_only=True, **dtype_keyword(torch.float32))
    vae = base.vae.requires_grad_(False).eval()
    record = {"base": str(model.base), **flux_latent_normalisation(vae, pixels)}
    tokenizer_2 = t5_tokenizer(folder, t5_tokens(cfg), caption_words())
    torch.manual_seed(cfg.train.seed)
    text_encoder_2 = t5_encoder(
        model.t5_width, model.t5_feed_forward, model.t5_layers, model.t5_heads, len(tokenizer_2)
    )
    clip = base.text_encoder.requires_grad_(False).eval()
    transformer = build_transformer(model, vae.config.latent_channels, model.t5_width, clip.config.hidden_size)
    pipeline = FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=base.tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return pipeline, record


class PretrainFluxTrainer(PretrainTextToImageTrainer):
    """The T5 encoder and the Flux transformer with the shared loop; ``finish`` (writes ``RUN/pipeline``) is the SD
    trainer's."""

    def build(self, config: DictConfig, accelerator, run_dir: Path) -> Setup:
        if config.model.init_from:
            raise ConfigError("model.init_from: family flux pretrains from model.base only; unset model.init_from")
        images = pretraining_images(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        pipeline, record = build_flux_pipeline(config, to_pixels(images.images), run_dir / "t5_tokenizer")
        (run_dir / "vae_normalisation.json").write_text(json.dumps(record, indent=2) + "\n")
        vp.attach(pipeline, [("full", {"tower": "transformer"})])
        pipeline.text_encoder.requires_grad_(False)
        pipeline.text_encoder_2.requires_grad_(True)  # no visionpeft tower: trained as a plain module
        adapted = pipeline_modules(pipeline)
        subjects = sorted(images.subjects())
        held_out = ", ".join(config.data.exclude) or "none"
        summary = [
            f"{len(images)} captioned images of {len(subjects)} subjects at {config.model.image_size} px; "
            f"held out: {held_out}",
            f"vae and clip from {config.model.base} (frozen); latents shift {record['shift_factor']:.4f}, "
            f"scale {record['scaling_factor']:.4f}",
        ]
        return Setup(
            FlowDenoiser(adapted, pipeline, config),
            adapted,
            FluxSampleGrids(pipeline, config, run_dir),
            CaptionedPixels(images),
            frozen=[pipeline.vae, pipeline.text_encoder],
            loader={"drop_last": True},
            summary=summary,
            state={"pipeline": pipeline, "vae": record, "images": len(images), "subjects": subjects},
        )
