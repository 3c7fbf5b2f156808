"""Text-to-image personalization from a few images: textual inversion, DreamBooth-LoRA, DiffFit - one trainer.

Loads any diffusers Stable Diffusion 1.x / 2.x or XL pipeline (hub id or local folder; SDXL's conditioning comes from
its prompt encoder, :mod:`.sdxl_conditioning`, and its items carry their real crop), attaches the method(s), trains
with the shared accelerate loop on the denoising loss (optional prior preservation, EMA, and the objective's knobs:
min-SNR, noise offset, Huber loss, v-prediction, ...: ``optim``, :mod:`.diffusion_objective`; and the data's:
per-image captions, caption dropout, tag shuffle, aspect-ratio buckets - one bucket per batch -, loss masks:
``data``, :class:`~visionpeft.data.few_images.ImageKnobs`; class images cached by :mod:`visionpeft.data.class_images`),
writes validation images into the run folder, and saves files diffusers loads as they are: ``adapter/``
(visionpeft), ``diffusers/`` (``pytorch_lora_weights.safetensors`` / ``learned_embeds.safetensors``) and, for
methods that merge exactly (DiffFit, BitFit, full), ``merged/unet`` (plain diffusers weights); with
``train.export=[kohya]`` also ``kohya/lora_kohya.safetensors`` (:mod:`.run_exports`).
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
from ..backbones.diffusers_flow import is_clip_text
from ..backbones.diffusers_loading import (
    FAMILY_NAMES,
    PATCHED_FAMILIES,
    family_of_class,
    load_pipeline,
    missing_t5,
    pipeline_index,
    replace_vae,
)
from ..checkpoint.base_weights import frozen_weights_sha256
from ..config import method_configs
from ..config.diffusion_objective import objective_of
from ..data.buckets import MICRO_CONDITIONS, BucketBatchSampler
from ..data.captions import CaptionAugment
from ..data.class_images import cached_class_images, class_image_fields
from ..data.few_images import FewImages, ImageKnobs
from ..errors import ConfigError
from .block_rates import block_lr_multipliers
from .diffusion import DiffusionParts, denoiser_of, diffusion_loss, frozen_modules, prompt_encoder
from .diffusion_objective import check_objective, use_trained_sampling
from .logs import get_logger
from .run import Setup, run_task
from .run_exports import check_exports, write_exports

logger = get_logger(__name__)


class PairedPrior(Dataset):
    """Instance items paired with class items (cycled) for prior preservation."""

    def __init__(self, instance: Dataset, prior: Dataset) -> None:
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return len(self.instance)

    def __getitem__(self, index: int) -> dict:
        item, cls = self.instance[index], self.prior[index % len(self.prior)]
        conditions = {f"class_{key}": cls[key] for key in MICRO_CONDITIONS if key in cls}
        return {**item, "class_pixel_values": cls["pixel_values"], "class_prompt": cls["prompt"], **conditions}


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
        conditions = micro_conditions(batch)
        prior = "class_pixel_values" in batch
        n = pixels.shape[0]
        if prior and batch["class_pixel_values"].shape[2:] != pixels.shape[2:]:  # a bucket other than the square
            instance = self.losses(pixels, prompts, mask, conditions)
            class_losses = self.losses(
                batch["class_pixel_values"], list(batch["class_prompt"]), None, micro_conditions(batch, "class_")
            )
            return instance.mean() + self.cfg.prior.weight * class_losses.mean()
        if prior:
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            prompts += list(batch["class_prompt"])
            if mask is not None:  # class images count everywhere
                mask = torch.cat([mask, torch.ones_like(mask[:1]).expand(len(pixels) - n, -1, -1, -1)])
            extra = micro_conditions(batch, "class_")  # SD 1.x class images carry none: nothing reads them
            if conditions is not None and extra is not None:
                conditions = {key: torch.cat([value, extra[key]]) for key, value in conditions.items()}
        losses = self.losses(pixels, prompts, mask, conditions)
        if not prior:
            return losses.mean()
        return losses[:n].mean() + self.cfg.prior.weight * losses[n:].mean()

    def losses(
        self,
        pixels: torch.Tensor,
        prompts: list[str],
        mask: torch.Tensor | None = None,
        conditions: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-sample denoising losses (masked where a mask is given; SDXL's time ids from ``conditions``)."""
        return diffusion_loss(
            self.parts, pixels, prompts, objective=self.objective, reduction="none", mask=mask, conditions=conditions
        )


def micro_conditions(batch: dict, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """The batch's SDXL micro-conditioning (``original_size``, ``crop_top_left``, ``target_size``; the class
    images' under ``class_``), or None when its items carry none."""
    found = {key: batch[prefix + key] for key in MICRO_CONDITIONS if prefix + key in batch}
    return found or None


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
        options = {"guidance_rescale": train.guidance_rescale} if takes(self.pipeline, "guidance_rescale") else {}
        length = self.cfg.optim.get("max_sequence_length")
        if length and takes(self.pipeline, "max_sequence_length"):  # T5 as the run trains it (Flux / SD3)
            options["max_sequence_length"] = length
        drawn = []
        for prompt in prompts:
            with accelerator.autocast():  # frozen weights may be half precision, trained ones fp32
                drawn.append(
                    self.pipeline(
                        prompt,
                        num_inference_steps=train.validation_steps,
                        generator=generator,
                        num_images_per_prompt=per_prompt or train.validation_images,
                        height=self.cfg.data.size,
                        width=self.cfg.data.size,
                        **options,
                    ).images
                )
        return drawn


def takes(pipeline, argument: str) -> bool:
    """Whether the pipeline's ``__call__`` has ``argument`` (Flux / SD3 pipelines have no ``guidance_rescale``)."""
    import inspect

    return argument in inspect.signature(type(pipeline).__call__).parameters


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


def image_knobs(data: DictConfig, micro_conditioning: bool = False) -> ImageKnobs:
    """The per-image knobs of ``data`` (captions, caption augmentation, buckets, loss masks) and whether items
    carry SDXL's micro-conditioning."""
    return ImageKnobs(
        captions=data.captions == "files",
        augment=CaptionAugment(data.caption_dropout, data.shuffle_tags, data.keep_tokens),
        buckets=(data.min_bucket_reso, data.max_bucket_reso, data.bucket_reso_steps) if data.buckets else None,
        masks=data.masks,
        alpha_mask=data.alpha_mask,
        micro_conditioning=micro_conditioning,
    )


def check_family(model: DictConfig, family: str | None, class_name: str) -> None:
    """The pipeline's family must be the one the recipe is written for (``model.family``, when set).

    Raises:
        ConfigError: An SDXL recipe on a Stable Diffusion 1.x / 2.x pipeline, the reverse, or another pipeline.
    """
    want = model.family
    if want is None or family == want:
        return
    held = f"a {class_name}" + (f" ({FAMILY_NAMES[family]})" if family else "")
    other = f"; use a recipe written for {FAMILY_NAMES[family]} or set model.family=null" if family else ""
    raise ConfigError(
        f"model.family={want}: this recipe is for {FAMILY_NAMES[want]} pipelines, but {model.name} holds {held}{other}"
    )


def check_size(size: int, factor: int, model: str, patched: bool = False) -> None:
    """``data.size`` must be a whole number of latent pixels: a multiple of the VAE's downscaling (``patched``:
    of twice that, a Flux / SD3 transformer reading 2 x 2 patches of latents)."""
    if size % factor:
        lower = size - size % factor
        what = f"the downscaling of {model}'s VAE" + (
            " times the transformer's 2 x 2 latent patches" if patched else ""
        )
        raise ConfigError(
            f"data.size ({size}) is not a multiple of {factor}, {what}; use {lower or factor} or {lower + factor}"
        )


def expected_family(config: DictConfig) -> str | None:
    """The pipeline family as far as the model's files tell before anything loads (a local folder or the hub
    cache: ``model_index.json``), checked against ``model.family``, with ``data.size`` checked against its VAE
    (``vae/config.json``); else ``model.family``."""
    found = pipeline_index(config.model.name)
    if found is None:
        return config.model.family
    index, vae = found
    class_name = str(index.get("_class_name", "an unknown pipeline"))
    family = family_of_class(class_name)
    check_family(config.model, family, class_name)
    lacking = missing_t5(index, family)
    if lacking:
        tokenizer = lacking.replace("text_encoder", "tokenizer")
        raise ConfigError(
            f"{config.model.name} has no T5 text encoder ({lacking} / {tokenizer} in its model_index.json): "
            f"{class_name} conditions on T5's hidden states; use a folder that holds it"
        )
    if vae is not None and config.model.vae is None and vae.get("block_out_channels"):
        patched = family in PATCHED_FAMILIES
        factor = 2 ** (len(vae["block_out_channels"]) - 1) * (2 if patched else 1)
        check_size(config.data.size, factor, config.model.name, patched)
    return family


def text_encoder_loras(config: DictConfig, specs: list, towers: list[str]) -> list:
    """``train_text_encoder``: the U-Net LoRA's rank, alpha, dropout and DoRA switch on every text encoder's q, k,
    v and out projections (diffusers' ``--train_text_encoder`` targets ``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``)."""
    if not config.train_text_encoder:
        return []
    from ..methods import make_config

    (lora,) = [spec for name, spec in specs if name == "lora"]
    options = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "use_dora": lora.use_dora}
    return [("lora", make_config("lora", {**options, "tower": t, "targets": ["q", "k", "v", "o"]})) for t in towers]


def check_text_encoder_option(config: DictConfig, specs: list) -> None:
    """``train_text_encoder`` takes its rank from the one U-Net LoRA of the run."""
    if not config.train_text_encoder:
        return
    loras = [spec for name, spec in specs if name == "lora" and spec.tower in (None, "unet")]
    if len(loras) != 1 or len(loras) != sum(name == "lora" for name, _ in specs):
        raise ConfigError(
            "train_text_encoder=true adds a LoRA on every text encoder with the rank of the run's one U-Net LoRA; "
            "give exactly one method lora (on the U-Net), or list the text-encoder LoRAs in method yourself"
        )


def check_bucket_grid(pipeline, data: DictConfig, model: str) -> None:
    """Bucket sides must be whole latent grids of the model: the VAE's scale times the U-Net's downsampling (a
    transformer's: its 2 x 2 latent patches)."""
    if not data.buckets:
        return
    vae = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    unet = getattr(pipeline, "unet", None)
    halvings = len(unet.config.block_out_channels) - 1 if unet is not None else 1
    grid = vae * 2**halvings
    if data.bucket_reso_steps % grid:
        denoiser = (
            f"its U-Net halves the latents {halvings} times"
            if unet is not None
            else "its transformer reads 2 x 2 latent patches"
        )
        raise ConfigError(
            f"data.bucket_reso_steps ({data.bucket_reso_steps}) must be a multiple of {grid} for {model}: its VAE "
            f"scales by {vae} and {denoiser}"
        )


def save_outputs(pipeline, adapted: nn.Module, run_dir: Path, base: str | None = None) -> list[Path]:
    """Writes the adapter in visionpeft and diffusers formats, and merged U-Net (Flux / SD3: transformer) weights
    where that is exact.

    Args:
        base: The pipeline to merge into (the run's ``model.name``) when training stored the frozen weights in lower
            precision (``train.base_storage``, or half precision under mixed precision): the adapter is saved
            against the full-precision weights, while the training copy holds them rounded (fp8: under
            ``parametrizations.weight.original`` keys that diffusers' loaders do not read). None: the training copy.
    """
    written = [vp.save_adapter(adapted, run_dir / "adapter")]
    if vp.can_export(pipeline, "diffusers"):
        written.append(vp.save_adapter(pipeline, run_dir / "diffusers", format="diffusers"))
    elif vp.can_merge(adapted):  # what diffusers' files cannot hold but merges exactly: plain denoiser weights
        if base is None:
            merged = copy.deepcopy(adapted)
        else:
            merged = pipeline_modules(vp.load_adapter(load_pipeline(base), run_dir / "adapter"))
        vp.merge(merged)
        name = "unet" if hasattr(merged, "unet") else "transformer"
        getattr(merged, name).save_pretrained(run_dir / "merged" / name)
        written.append(run_dir / "merged" / name)
    return written


class PersonalizationTrainer:
    """Loads the pipeline, builds the few-image set (plus class images for prior preservation), attaches the
    method(s); after training, writes the adapter and the files diffusers loads."""

    def build(self, config: DictConfig, accelerator, run_dir: Path) -> Setup:
        if not config.data.images:
            raise ConfigError("data.images is required: the folder with the subject or style images")
        data, skip = config.data, config.data.skip_bad_images
        specs = method_configs(config, {"token": config.token})
        check_text_encoder_option(config, specs)
        family = expected_family(config)

        def subject_images(sdxl: bool) -> FewImages:
            return FewImages(
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
                image_knobs(data, micro_conditioning=sdxl),
            )

        # read (and checked: a missing folder or a corrupt image fails here) before the pipeline loads
        subject = subject_images(family == "sdxl")
        pipeline = load_pipeline(config.model.name)
        loaded = family_of_class(type(pipeline).__name__)
        check_family(config.model, loaded, type(pipeline).__name__)  # a hub id first seen now
        if config.model.vae is not None:
            replace_vae(pipeline, config.model.vae, "model.vae")
        patched = loaded in PATCHED_FAMILIES
        vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        check_size(data.size, vae_scale * (2 if patched else 1), config.model.name, patched)
        prompt_encoder(pipeline, objective_of(config.optim)).check_pipeline(config.model.name)  # T5, guidance
        if (loaded == "sdxl") != (family == "sdxl"):
            subject = subject_images(loaded == "sdxl")
        check_objective(objective_of(config.optim), pipeline.scheduler, config.model.name)
        check_bucket_grid(pipeline, data, config.model.name)
        adapted = pipeline_modules(pipeline)
        clip = [name for name in adapted.text_encoders() if is_clip_text(getattr(adapted, name))]  # never T5
        vp.attach(pipeline, specs + text_encoder_loras(config, specs, clip))
        check_exports(pipeline, list(config.train.export))  # before training, not after it
        multipliers = {**block_lr_multipliers(config.optim.block_lr, adapted), **text_encoder_multipliers(config.optim)}
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
                ImageKnobs(micro_conditioning=loaded == "sdxl"),
            )
            dataset = PairedPrior(dataset, prior)
        text_encoders = [getattr(pipeline, name) for name in adapted.text_encoders()]
        denoiser_net = denoiser_of(pipeline)
        if config.train.gradient_checkpointing:
            denoiser_net.enable_gradient_checkpointing()
            for encoder in text_encoders:
                encoder.gradient_checkpointing_enable()
        if config.train.xformers:
            denoiser_net.enable_xformers_memory_efficient_attention()
        objective = PersonalizationObjective(pipeline, config, run_dir)
        cache = config.train.cache_latents
        if cache and (data.flip > 0 or not data.center_crop):
            logger.info(
                "train.cache_latents is off: random crops / flips change the images every epoch "
                "(set data.center_crop=true data.flip=0 to cache)"
            )
            cache = False
        denoiser = Denoiser(adapted, pipeline, config, cache)
        return Setup(
            denoiser,
            adapted,
            objective,
            dataset,
            frozen=frozen_modules(pipeline, adapted.text_encoders(), denoiser.parts),
            summary=summary,
            state={"pipeline": pipeline},
            batch_sampler=bucket_batches(subject, config.train.seed) if data.buckets else None,
            lr_multipliers=multipliers,
            weight_decays=text_encoder_decays(config.optim),
        )

    def finish(self, config: DictConfig, loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        if not loop.accelerator.is_main_process:
            return {"outputs": []}
        base = config.model.name if stores_lowered(config, loop.accelerator) else None
        outputs = save_outputs(setup.state["pipeline"], setup.adapted, run_dir, base)
        return {"outputs": outputs + write_exports(setup.state["pipeline"], run_dir, list(config.train.export))}


def stores_lowered(config: DictConfig, accelerator) -> bool:
    """Whether the run's training copy holds its frozen weights in lower precision (``train.base_storage``, or half
    precision under mixed precision), so that exports of base weights come from a full-precision copy."""
    return config.train.get("base_storage", "none") != "none" or accelerator.mixed_precision != "no"


def text_encoder_multipliers(optim: DictConfig) -> dict[str, float]:
    """``optim.text_encoder_lr`` as the learning-rate multiplier of every text encoder's tensors (names
    ``text_encoder.*``, ``text_encoder_2.*``), or none."""
    if optim.text_encoder_lr is None or not optim.lr:
        return {}
    return {"text_encoder": optim.text_encoder_lr / optim.lr}


def text_encoder_decays(optim: DictConfig) -> dict[str, float]:
    """``optim.text_encoder_weight_decay`` as the weight decay of every text encoder's tensors, or none."""
    decay = optim.get("text_encoder_weight_decay")
    return {} if decay is None else {"text_encoder": decay}


def bucket_batches(subject: FewImages, seed: int):
    """The loader's batch sampler for a bucketed set: one bucket per micro-batch."""
    buckets = subject.item_buckets()
    return lambda micro_batch: BucketBatchSampler(buckets, micro_batch, seed)


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Trains (see :func:`~.run.run_task` for the options); returns ``{"outputs": [paths], "steps": n, ...}``."""
    return run_task(PersonalizationTrainer(), config, run_dir, **options)
