"""Text-to-image personalization from a few images: textual inversion, DreamBooth-LoRA, DiffFit - one trainer.

Loads any diffusers Stable Diffusion 1.x / 2.x pipeline (hub id or local folder), attaches the method(s), trains
with the shared accelerate loop on the denoising loss (optional prior preservation, EMA, and the objective's knobs:
min-SNR, noise offset, Huber loss, v-prediction, ...: ``optim``, :mod:`.diffusion_objective`),
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
from ..config import method_configs
from ..config.diffusion_objective import objective_of
from ..data.few_images import FewImages
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
        parts = DiffusionParts.from_pipeline(
            pipeline, cache_prompts=True, cache_latents=cache_latents, objective=self.objective
        )
        self.__dict__["parts"] = parts
        self.cfg = cfg

    def forward(self, batch: dict) -> torch.Tensor:
        pixels, prompts = batch["pixel_values"], list(batch["prompt"])
        prior = "class_pixel_values" in batch
        if prior:
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            prompts += list(batch["class_prompt"])
        losses = diffusion_loss(self.parts, pixels, prompts, objective=self.objective, reduction="none")
        if not prior:
            return losses.mean()
        n = batch["pixel_values"].shape[0]
        return losses[:n].mean() + self.cfg.prior.weight * losses[n:].mean()


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


def _class_images(pipeline, cfg: DictConfig, run_dir: Path) -> Path:
    """The prior-preservation folder, topped up with images the base model generates from the class prompt."""
    folder = Path(cfg.prior.images) if cfg.prior.images else run_dir / "class_images"
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.png"))) + len(list(folder.glob("*.jpg")))
    generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed)
    pipeline.set_progress_bar_config(disable=True)
    for index in range(have, cfg.prior.num_images):
        image = pipeline(
            cfg.prior.class_prompt,
            num_inference_steps=cfg.prior.sample_steps,
            generator=generator,
            height=cfg.data.size,
            width=cfg.data.size,
        ).images[0]
        image.save(folder / f"class_{index:04d}.png")
    return folder


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
        )
        pipeline = load_pipeline(config.model.name)
        check_objective(objective_of(config.optim), pipeline.scheduler, config.model.name)
        dataset: Dataset = subject
        if config.prior.enabled:
            folder = _class_images(pipeline, config, run_dir)
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
        vp.attach(pipeline, method_configs(config, {"token": config.token}))
        adapted = pipeline_modules(pipeline)
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
            summary=[f"{len(subject.images)} images, {len(dataset)} training items"],
            state={"pipeline": pipeline},
        )

    def finish(self, config: DictConfig, loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        if not loop.accelerator.is_main_process:
            return {"outputs": []}
        return {"outputs": save_outputs(setup.state["pipeline"], setup.adapted, run_dir)}


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Trains (see :func:`~.run.run_task` for the options); returns ``{"outputs": [paths], "steps": n, ...}``."""
    return run_task(PersonalizationTrainer(), config, run_dir, **options)
