"""Text-to-image personalization from a few images: textual inversion, DreamBooth-LoRA, DiffFit - one trainer.

Loads any diffusers Stable Diffusion 1.x / 2.x pipeline (hub id or local folder), attaches the method(s), trains
with the shared accelerate loop on the denoising loss (optional prior preservation, EMA, and the objective's knobs:
min-SNR, noise offset, Huber loss, v-prediction, ...: ``optim``, :mod:`.diffusion_objective`; and the data's:
per-image captions, caption dropout, tag shuffle, aspect-ratio buckets - one bucket per batch -, loss masks:
``data``, :class:`~visionpeft.data.few_images.ImageKnobs`; class images cached by :mod:`visionpeft.data.class_images`),
writes validation images into the run folder, and saves files diffusers loads as they are: ``adapter/``
(visionpeft), ``diffusers/`` (``pytorch_lora_weights.safetensors`` / ``learned_embeds.safetensors``) and, for
methods that merge exactly (DiffFit, BitFit, full), ``merged/unet`` (plain diffusers weights).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

import visionpeft as vp

from ..backbones import pipeline_modules
from ..backbones.diffusers_loading import load_pipeline
from ..checkpoint.base_weights import frozen_weights_sha256
from ..config import method_configs
from ..config.diffusion_objective import objective_of
from ..data.buckets import BucketBatchSampler
from ..data.captions import CaptionAugment
from ..data.class_images import cached_class_images, class_image_fields
from ..data.few_images import FewImages, ImageKnobs
from ..errors import ConfigError
from .diffusion import DiffusionParts, diffusion_loss
from .diffusion_objective import check_objective, use_trained_sampling
from .logs import get_logger
from .run import Setup, run_task

logger = get_logger(__name__)


class PairedPrior(Dataset):
    """Instance items paired with class items (cycled) for prior preservation."""

    def __init__(self, instance: Dataset, prior: Dataset) -> None:
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return len(self.instance)

    def __getitem__(self, index: int) -> dict:
        item, cls = self.instance[index], self.prior[index % len(self.prior)]
        return {**item, "class_pixel_values": cls["pixel_values"], "class_prompt": cls["prompt"]}


class Denoiser(nn.Module):
    """The trained modules plus the frozen VAE, with the denoising loss as forward (what accelerate wraps)."""

    def __init__(self, adapted: nn.Module, pipeline, cfg: DictConfig, cache_latents: bool = False) -> None:
        super().__init__()
        self.adapted, self.vae = adapted, pipeline.vae
        self.objective = objective_of(cfg.optim)
        # shuffled tags make nearly every prompt batch new: caching them would only grow
        parts = DiffusionParts.from_pipeline(
            pipeline, cache_prompts=not cfg.data.shuffle_tags, cache_latents=cache_latents, objective=self.objective
        )
        self.__dict__["parts"] = parts
        self.cfg = cfg

    def forward(self, batch: dict) -> torch.Tensor:
        pixels, prompts, mask = batch["pixel_values"], list(batch["prompt"]), batch.get("mask")
        prior = "class_pixel_values" in batch
        n = pixels.shape[0]
        if prior and batch["class_pixel_values"].shape[2:] != pixels.shape[2:]:  # a bucket other than the square
            instance = self.losses(pixels, prompts, mask)
            return (
                instance.mean()
                + self.cfg.prior.weight * self.losses(batch["class_pixel_values"], list(batch["class_prompt"])).mean()
            )
        if prior:
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            prompts += list(batch["class_prompt"])
            if mask is not None:  # class images count everywhere
                mask = torch.cat([mask, torch.ones_like(mask[:1]).expand(len(pixels) - n, -1, -1, -1)])
        losses = self.losses(pixels, prompts, mask)
        if not prior:
            return losses.mean()
        return losses[:n].mean() + self.cfg.prior.weight * losses[n:].mean()

    def losses(self, pixels: torch.Tensor, prompts: list[str], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample denoising losses (masked where a mask is given)."""
        return diffusion_loss(self.parts, pixels, prompts, objective=self.objective, reduction="none", mask=mask)


class PersonalizationObjective:
    """Loss from :class:`Denoiser`; "evaluation" writes validation images (no metric selects checkpoints), sampled
    as the run trains (its prediction type, zero terminal SNR) with ``train.guidance_rescale``."""

    metric = "none"

    def __init__(self, pipeline, cfg: DictConfig, run_dir: Path) -> None:
        self.pipeline, self.cfg, self.run_dir = pipeline, cfg, run_dir
        use_trained_sampling(pipeline, objective_of(cfg.optim))
        self.calls = 0

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch)

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        self.calls += 1
        if not accelerator.is_main_process or not self.cfg.train.validation_prompts:
            return {}
        folder = self.run_dir / "validation" / f"{self.calls:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        prompts = list(self.cfg.train.validation_prompts)
        self.last_images = {}
        for p, (prompt, images) in enumerate(zip(prompts, self.draw(accelerator, prompts))):
            for i, image in enumerate(images):
                image.save(folder / f"{p:02d}_{i}.png")
            self.last_images[f"validation/{p:02d} {prompt}"] = images
        return {}

    def draw(self, accelerator, prompts: list[str], per_prompt: int | None = None, seed: int | None = None) -> list:
        """``per_prompt`` images (default ``train.validation_images``) of each prompt, drawn in turn from one
        generator seeded with ``seed`` (default ``train.seed``): a list of image lists, one per prompt."""
        train = self.cfg.train
        generator = torch.Generator(device="cpu").manual_seed(train.seed if seed is None else seed)
        self.pipeline.set_progress_bar_config(disable=True)
        drawn = []
        for prompt in prompts:
            with accelerator.autocast():  # frozen weights may be half precision, trained ones fp32
                drawn.append(
                    self.pipeline(
                        prompt,
                        num_inference_steps=train.validation_steps,
                        generator=generator,
                        num_images_per_prompt=per_prompt or train.validation_images,
                        guidance_rescale=train.guidance_rescale,
                        height=self.cfg.data.size,
                        width=self.cfg.data.size,
                    ).images
                )
        return drawn


def class_images(pipeline, adapted: nn.Module, cfg: DictConfig, device: torch.device) -> tuple[Path, str]:
    """The prior-preservation folder and a line saying where it came from: ``prior.images`` topped up with images
    the base model generates from the class prompt, or (by default) the class-image cache's entry for this base
    model, prompt, count, size and sampler (:mod:`visionpeft.data.class_images`), generated on a miss.

    Methods are attached but still at their initial state, which leaves the base model's outputs as they are (LoRA's
    B = 0, DiffFit's scales 1, new tokens unused by the class prompt); the key holds the frozen-weights sha256 that a
    saved adapter records, so methods that train base tensors in place (BitFit, DiffFit) key their own entries."""
    prior, size = cfg.prior, cfg.data.size
    generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    pipeline.set_progress_bar_config(disable=True)

    def generate(index: int):
        pipeline.to(device)
        return pipeline(
            prior.class_prompt,
            num_inference_steps=prior.sample_steps,
            generator=generator,
            height=size,
            width=size,
        ).images[0]

    if prior.images:
        folder = Path(prior.images)
        folder.mkdir(parents=True, exist_ok=True)
        have = len(list(folder.glob("*.png"))) + len(list(folder.glob("*.jpg")))
        for index in range(have, prior.num_images):
            generate(index).save(folder / f"class_{index:04d}.png")
        return folder, f"class images: {folder}"
    fields = class_image_fields(
        frozen_weights_sha256(adapted),
        cfg.model.name,
        prior.class_prompt,
        prior.num_images,
        (size, size),
        sampler_settings(pipeline, prior.sample_steps, cfg.train.seed, device),
    )
    root = Path(prior.cache_dir) if prior.cache_dir else Path(cfg.train.output_dir) / "class_image_cache"
    entry, reused = cached_class_images(root, fields, generate)
    return entry, f"class images: {entry} ({'reused' if reused else 'generated'})"


def sampler_settings(pipeline, steps: int, seed: int, device: torch.device) -> dict[str, Any]:
    """How class images are sampled: the scheduler's class and config (without diffusers' own ``_`` entries), the
    steps, the pipeline's default guidance scale, the seed and the device type (CPU and GPU draw differently)."""
    import inspect

    guidance = inspect.signature(type(pipeline).__call__).parameters.get("guidance_scale")
    return {
        "scheduler": type(pipeline.scheduler).__name__,
        "config": {k: v for k, v in pipeline.scheduler.config.items() if not k.startswith("_")},
        "steps": steps,
        "guidance_scale": None if guidance is None else guidance.default,
        "seed": seed,
        "device": device.type,
    }


def image_knobs(data: DictConfig) -> ImageKnobs:
    """The per-image knobs of ``data`` (captions, caption augmentation, buckets, loss masks)."""
    return ImageKnobs(
        captions=data.captions == "files",
        augment=CaptionAugment(data.caption_dropout, data.shuffle_tags, data.keep_tokens),
        buckets=(data.min_bucket_reso, data.max_bucket_reso, data.bucket_reso_steps) if data.buckets else None,
        masks=data.masks,
        alpha_mask=data.alpha_mask,
    )


def check_bucket_grid(pipeline, data: DictConfig, model: str) -> None:
    """Bucket sides must be whole latent grids of the model: the VAE's scale times the U-Net's downsampling."""
    if not data.buckets:
        return
    vae = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    halvings = len(pipeline.unet.config.block_out_channels) - 1
    grid = vae * 2**halvings
    if data.bucket_reso_steps % grid:
        raise ConfigError(
            f"data.bucket_reso_steps ({data.bucket_reso_steps}) must be a multiple of {grid} for {model}: its VAE "
            f"scales by {vae} and its U-Net halves the latents {halvings} times"
        )


def save_outputs(pipeline, adapted: nn.Module, run_dir: Path) -> list[Path]:
    """Writes the adapter in visionpeft and diffusers formats, and merged U-Net weights where that is exact."""
    written = [vp.save_adapter(adapted, run_dir / "adapter")]
    if vp.can_export(pipeline, "diffusers"):
        written.append(vp.save_adapter(pipeline, run_dir / "diffusers", format="diffusers"))
    elif vp.can_merge(adapted):  # what diffusers' files cannot hold but merges exactly: plain U-Net weights
        merged = copy.deepcopy(adapted)
        vp.merge(merged)
        merged.unet.save_pretrained(run_dir / "merged" / "unet")
        written.append(run_dir / "merged" / "unet")
    return written


class PersonalizationTrainer:
    """Loads the pipeline, builds the few-image set (plus class images for prior preservation), attaches the
    method(s); after training, writes the adapter and the files diffusers loads."""

    def build(self, config: DictConfig, accelerator, run_dir: Path) -> Setup:
        if not config.data.images:
            raise ConfigError("data.images is required: the folder with the subject or style images")
        data, skip = config.data, config.data.skip_bad_images
        # read (and checked: a missing folder or a corrupt image fails here) before the pipeline loads
        subject = FewImages(
            data.images,
            config.token,
            data.size,
            data.kind,
            data.prompt,
            data.repeats,
            data.center_crop,
            data.flip,
            config.train.seed,
            skip,
            image_knobs(data),
        )
        pipeline = load_pipeline(config.model.name)
        check_objective(objective_of(config.optim), pipeline.scheduler, config.model.name)
        check_bucket_grid(pipeline, data, config.model.name)
        vp.attach(pipeline, method_configs(config, {"token": config.token}))
        adapted = pipeline_modules(pipeline)
        dataset: Dataset = subject
        summary = [f"{len(subject.images)} images, {len(subject)} training items", *subject.summary()]
        if config.prior.enabled:
            folder, line = class_images(pipeline, adapted, config, accelerator.device)
            summary.append(line)
            prior = FewImages(
                folder,
                config.token,
                data.size,
                "fixed",
                config.prior.class_prompt,
                1,
                data.center_crop,
                data.flip,
                config.train.seed,
                skip,
            )
            dataset = PairedPrior(dataset, prior)
        if config.train.gradient_checkpointing:
            pipeline.unet.enable_gradient_checkpointing()
            pipeline.text_encoder.gradient_checkpointing_enable()
        if config.train.xformers:
            pipeline.unet.enable_xformers_memory_efficient_attention()
        objective = PersonalizationObjective(pipeline, config, run_dir)
        cache = config.train.cache_latents
        if cache and (data.flip > 0 or not data.center_crop):
            logger.info(
                "train.cache_latents is off: random crops / flips change the images every epoch "
                "(set data.center_crop=true data.flip=0 to cache)"
            )
            cache = False
        return Setup(
            Denoiser(adapted, pipeline, config, cache),
            adapted,
            objective,
            dataset,
            frozen=[pipeline.unet, pipeline.text_encoder, pipeline.vae],
            summary=summary,
            state={"pipeline": pipeline},
            batch_sampler=bucket_batches(subject, config.train.seed) if data.buckets else None,
        )

    def finish(self, config: DictConfig, loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        if not loop.accelerator.is_main_process:
            return {"outputs": []}
        return {"outputs": save_outputs(setup.state["pipeline"], setup.adapted, run_dir)}


def bucket_batches(subject: FewImages, seed: int):
    """The loader's batch sampler for a bucketed set: one bucket per micro-batch."""
    buckets = subject.item_buckets()
    return lambda micro_batch: BucketBatchSampler(buckets, micro_batch, seed)


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Trains (see :func:`~.run.run_task` for the options); returns ``{"outputs": [paths], "steps": n, ...}``."""
    return run_task(PersonalizationTrainer(), config, run_dir, **options)
