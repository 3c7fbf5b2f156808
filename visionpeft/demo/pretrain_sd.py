"""Pretraining of the tiny text-to-image pipeline: the VAE, then the U-Net (+ text encoder) on the captioned mix.

The VAE trains first in its own short loop (:func:`~.tiny_sd_parts.vae_stage`, saved in ``RUN/vae``); its
latents of every image are then cached (the VAE is frozen) and the U-Net learns the denoising loss of Stable
Diffusion (:func:`~.diffusion.diffusion_loss`: DDPM forward process, epsilon target, min-SNR weighting, and the
other knobs of ``optim``) with the shared loop (progress, resume, EMA, ``metrics.jsonl``). With
``optim.prediction_type`` / ``rescale_zero_terminal_snr`` the new pipeline's scheduler is made for them (its saved
config says so). Captions are dropped to ``""`` at ``caption_dropout`` so
that classifier-free guidance works. The text encoder trains with the U-Net (method ``full`` on both towers) unless
``model.train_text_encoder=false``. ``model.init_from`` continues an exported pipeline instead of building one
(no VAE stage; the earlier record goes to ``RUN/earlier_training.json``). Validation writes a grid of sample images
per prompt family; ``finish`` writes ``RUN/pipeline``, a ``StableDiffusionPipeline`` folder (fp32) that diffusers
loads alone; ``tools/pretrain.py`` ships it with U-Net and VAE in fp16 (:func:`~.tiny_sd_card.export_pipeline`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

import visionpeft as vp

from ..backbones import pipeline_modules
from ..config.diffusion_objective import objective_of
from ..trainers.diffusion import DiffusionParts, diffusion_loss, prompt_encoder, training_scheduler_from
from ..trainers.diffusion_objective import check_objective, use_trained_sampling
from ..trainers.logs import get_logger
from ..trainers.run import Setup
from .captioned_mix import CaptionedImages
from .tiny_sd_parts import (
    build_text_encoder,
    build_tokenizer,
    build_unet,
    continued_pipeline,
    pretraining_images,
    sampling_scheduler,
    to_pixels,
    training_noise_scheduler,
    vae_stage,
)

logger = get_logger(__name__)

#: ``RUN/<this>``: the training record of the pipeline a ``model.init_from`` run continues (for its model card)
EARLIER_RECORD = "earlier_training.json"

#: one validation row per family; digit 7 is held out, so its row shows what the model cannot draw
VALIDATION_PROMPTS = (
    "a handwritten digit three",
    "a handwritten digit seven",
    "a photo of gravel",
    "a photo of a face",
    "a photo of a cat",
    "red circle with blue background",
)


class CaptionedPixels(Dataset):
    """``{"pixel_values": (3, S, S) in [-1, 1], "prompt": caption}`` items of a :class:`CaptionedImages`."""

    def __init__(self, images: CaptionedImages) -> None:
        self.pixels, self.captions = to_pixels(images.images), images.captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixels[index], "prompt": self.captions[index]}


def dropped_captions(prompts, rate: float) -> list[str]:
    """The batch's captions, each replaced by ``""`` with probability ``rate`` (classifier-free guidance's
    unconditional examples)."""
    prompts = list(prompts)
    drop = torch.rand(len(prompts)) < rate
    return ["" if d else p for p, d in zip(prompts, drop.tolist())]


class TextToImageDenoiser(nn.Module):
    """The trained modules plus the frozen VAE; forward is the denoising loss of a batch (what accelerate wraps)."""

    def __init__(self, adapted: nn.Module, pipeline, cfg: DictConfig) -> None:
        super().__init__()
        self.adapted, self.vae = adapted, pipeline.vae
        frozen_text = not cfg.model.train_text_encoder
        self.objective = objective_of(cfg.optim)
        # the VAE is frozen: each image's latent distribution is computed once (latents are still sampled per step)
        parts = DiffusionParts(
            pipeline.unet,
            pipeline.vae,
            prompt_encoder(pipeline),
            training_scheduler_from(training_noise_scheduler().config, self.objective),
            {} if frozen_text else None,
            {},
        )
        self.__dict__["parts"] = parts
        self.cfg = cfg

    def forward(self, batch: dict) -> torch.Tensor:
        prompts = dropped_captions(batch["prompt"], self.cfg.data.caption_dropout)
        return diffusion_loss(self.parts, batch["pixel_values"], prompts, objective=self.objective)


class SampleGrids:
    """Validation: a grid of ``validation_images`` samples per prompt of :data:`VALIDATION_PROMPTS`."""

    metric = "none"

    def __init__(self, pipeline, cfg: DictConfig, run_dir: Path) -> None:
        self.pipeline, self.cfg, self.run_dir = pipeline, cfg, run_dir

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch)

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        from diffusers.utils import make_image_grid

        if not accelerator.is_main_process:
            return {}
        folder = self.run_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        step = len(list(folder.glob("*.png")))
        per_prompt = self.cfg.train.validation_images
        images = self.draw(per_prompt)
        make_image_grid(images, rows=len(VALIDATION_PROMPTS), cols=per_prompt).save(folder / f"{step:03d}.png")
        return {}

    def draw(self, per_prompt: int) -> list:
        """``per_prompt`` samples of each validation prompt, prompt after prompt, drawn with ``train.seed``."""
        train = self.cfg.train
        self.pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(train.seed)
        prompts = [p for p in VALIDATION_PROMPTS for _ in range(per_prompt)]
        return self.pipeline(
            prompts,
            num_inference_steps=train.validation_steps,
            generator=generator,
            guidance_scale=train.guidance_scale,
            guidance_rescale=train.guidance_rescale,
        ).images


def build_pipeline(cfg: DictConfig, vae):
    """A ``StableDiffusionPipeline`` around the trained VAE and a fresh U-Net, text encoder and tokenizer."""
    from diffusers import StableDiffusionPipeline

    tokenizer = build_tokenizer(cfg.model)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=build_text_encoder(cfg.model, tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(cfg.model),
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class PretrainTextToImageTrainer:
    """VAE stage, then the U-Net (+ text encoder) with the shared loop; writes ``RUN/pipeline`` at the end."""

    def build(self, config: DictConfig, accelerator, run_dir: Path) -> Setup:
        images = pretraining_images(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        objective = objective_of(config.optim)
        if config.model.init_from:
            pipeline, earlier = continued_pipeline(config.model.init_from, list(config.data.exclude))
            check_objective(objective, pipeline.scheduler, str(config.model.init_from))
            vae, vae_record = pipeline.vae, earlier["vae"]
            earlier = {**earlier, "init_from": str(config.model.init_from)}
            (run_dir / EARLIER_RECORD).write_text(json.dumps(earlier, indent=2) + "\n")
            torch.manual_seed(config.train.seed)
        else:  # a new model is made for the objective's prediction type: nothing to change
            check_objective(replace(objective, change_prediction_type=True), sampling_scheduler(), "a new pipeline")
            vae, vae_record = vae_stage(config.model, config.vae, images.images, config.train.seed, run_dir)
            torch.manual_seed(config.train.seed)
            pipeline = build_pipeline(config, vae)
        use_trained_sampling(pipeline, objective)  # validation grids and RUN/pipeline sample as it trains
        towers = ["unet", "text_encoder"] if config.model.train_text_encoder else ["unet"]
        vp.attach(pipeline, [("full", {"tower": tower}) for tower in towers])
        if not config.model.train_text_encoder:
            pipeline.text_encoder.requires_grad_(False)
        adapted = pipeline_modules(pipeline)
        subjects = sorted(images.subjects())
        held_out = ", ".join(config.data.exclude) or "none"
        mse = vae_record["reconstruction_mse"]
        summary = [
            f"{len(images)} captioned images of {len(subjects)} subjects at {config.model.image_size} px; "
            f"held out: {held_out}",
            f"vae: {vae_record['steps']} steps, reconstruction mse {mse:.4f}"
            + (f" (continuing {config.model.init_from})" if config.model.init_from else ""),
        ]
        return Setup(
            TextToImageDenoiser(adapted, pipeline, config),
            adapted,
            SampleGrids(pipeline, config, run_dir),
            CaptionedPixels(images),
            frozen=[vae],
            loader={"drop_last": True},
            summary=summary,
            state={"pipeline": pipeline, "vae": vae_record, "images": len(images), "subjects": subjects},
        )

    def finish(self, config: DictConfig, loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        pipeline = setup.state["pipeline"]
        result = {"vae": setup.state["vae"], "images": setup.state["images"], "subjects": setup.state["subjects"]}
        if not loop.accelerator.is_main_process:
            return result
        vp.merge(pipeline_modules(pipeline))  # full training: the weights are the model
        pipeline.save_pretrained(run_dir / "pipeline")
        record = {**result, "steps": loop.step}
        (run_dir / "pipeline" / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        return {**result, "outputs": [run_dir / "pipeline"]}
