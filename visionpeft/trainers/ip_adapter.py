"""IP-Adapter training on a Stable Diffusion pipeline, as tencent-ailab/IP-Adapter ``tutorial_train.py``.

Loads the pipeline and the frozen CLIP image encoder (``model.image_encoder``), attaches the ``ip_adapter`` method
(its ``image_embed_dim`` filled in from the encoder; other methods beside it if asked) and trains on captioned
images, each image also its own image prompt: the encoder's ``image_embeds`` (zeros for a dropped image, lines
376-382) reach the method through ``vp.conditioning(..., ip_image_embeds=...)`` around the denoising loss; for
``variant: plus`` its penultimate hidden states, a dropped image replaced by a black one before the encoder
(``tutorial_train_plus.py`` lines 395-403), and samples get the black image's states as their unconditional half, as
diffusers' ``encode_image`` gives them. Images go
through the processor diffusers' ``load_ip_adapter`` would give the pipeline (its ``feature_extractor``, else a
``CLIPImageProcessor`` at the encoder's size), so training, ``visionpeft generate`` and diffusers see the same
pixels. Validation draws, for the first training images, a sample with the image and its caption and one with the
image alone. The run folder receives ``adapter/`` (visionpeft) and ``ip_adapter/ip_adapter.safetensors`` with the
encoder in ``ip_adapter/image_encoder/``: ``pipe.load_ip_adapter(RUN, subfolder="ip_adapter",
weight_name="ip_adapter.safetensors")`` loads both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..adapter import attach, can_export, conditioning, methods_of
from ..backbones import pipeline_modules
from ..backbones.diffusers_loading import load_image_encoder, load_pipeline
from ..checkpoint.folder import save_adapter
from ..config import method_configs, methods_of_config
from ..config.diffusion_objective import DiffusionObjective, objective_of
from ..data.image_prompts import PromptDrops, captioned_mix_image_prompts, folder_image_prompts
from ..errors import CheckpointError, ConfigError
from .diffusion import DiffusionParts, diffusion_loss
from .diffusion_objective import check_objective, use_trained_sampling
from .run import Setup, run_task

#: the run's subfolder of the diffusers export and, inside it, the encoder's (load_ip_adapter's default name)
EXPORT_FOLDER, ENCODER_FOLDER = "ip_adapter", "image_encoder"


def image_processor(pipeline, encoder):
    """The processor of image prompts: the pipeline's ``feature_extractor``, else a ``CLIPImageProcessor`` at the
    encoder's image size, as diffusers' ``load_ip_adapter`` registers one."""
    from transformers import CLIPImageProcessor

    existing = getattr(pipeline, "feature_extractor", None)
    if existing is not None:
        return existing
    size = encoder.config.image_size
    return CLIPImageProcessor(size=size, crop_size=size)


@torch.no_grad()
def image_embeds(encoder: nn.Module, pixel_values: torch.Tensor, patches: bool = False) -> torch.Tensor:
    """The frozen encoder's ``image_embeds`` of processed images, or with ``patches`` its penultimate hidden states
    (IP-Adapter-plus), as diffusers' pipelines compute them."""
    pixels = pixel_values.to(device=encoder.device, dtype=encoder.dtype)
    if patches:
        return encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return encoder(pixels).image_embeds


def image_prompt(encoder: nn.Module, pixel_values: torch.Tensor, plus: bool):
    """``vp.conditioning``'s ``ip_image_embeds`` for sampling with these processed images: the ``image_embeds``
    (guidance's unconditional half: zeros), or for plus ``(negative, positive)``: the hidden states of a black image
    and of the images, as diffusers' ``encode_image`` computes them."""
    if not plus:
        return image_embeds(encoder, pixel_values)
    return image_embeds(encoder, torch.zeros_like(pixel_values), True), image_embeds(encoder, pixel_values, True)


def encoder_width(encoder: nn.Module, plus: bool) -> int:
    """The width of what the encoder gives an IP-Adapter: ``projection_dim``, plus: ``hidden_size``."""
    return encoder.config.hidden_size if plus else encoder.config.projection_dim


def is_plus(model) -> bool:
    """An IP-Adapter-plus is attached."""
    return any(m.name == "ip_adapter" and m.config.variant == "plus" for m in methods_of(model))


def check_embed_width(method_configs_: list, encoder: nn.Module) -> None:
    """Every attached IP-Adapter takes the encoder's embeddings.

    Raises:
        ConfigError: An ``image_embed_dim`` given that is not the encoder's ``projection_dim`` (plus:
            ``hidden_size``).
    """
    for name, config in method_configs_:
        width = encoder_width(encoder, getattr(config, "variant", "plain") == "plus")
        given = getattr(config, "image_embed_dim", width)
        if given != width:
            raise ConfigError(
                f"method '{name}' option image_embed_dim is {given}, but the image encoder's embeddings are {width} "
                "wide; leave it out (the task fills it in)"
            )


def released_weights_file(path: Path) -> Path:
    """The IP-Adapter weights a path names: the file itself, ``ip_adapter.safetensors`` in a folder, or a run
    folder's ``ip_adapter/ip_adapter.safetensors``.

    Raises:
        CheckpointError: None of those exists.
    """
    from ..methods.ip_adapter import SUBFOLDER, WEIGHT_NAME

    for candidate in (path, path / WEIGHT_NAME, path / SUBFOLDER / WEIGHT_NAME):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"no IP-Adapter at {path}: give a run folder (its {SUBFOLDER}/{WEIGHT_NAME}), that folder, or a "
        ".safetensors file in the released layout"
    )


def attach_released(pipe, path: Path, encoder_path: Path | None = None, scale: float = 1.0) -> tuple[str, nn.Module]:
    """Attaches the IP-Adapter of ``path`` (:func:`released_weights_file`: a run's export or a released plain or
    plus IP-Adapter ``.safetensors``) to ``pipe`` with its weights, and loads its image encoder (``encoder_path``, else
    ``image_encoder/`` beside the weights, where ``load_ip_adapter`` looks) on the pipeline's device.

    Returns:
        (what was loaded, in words; the image encoder).

    Raises:
        CheckpointError: An unreadable file, one for another cross-attention width or another encoder's
            embeddings, or no encoder folder.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..methods.ip_adapter import released_layout_options

    file = released_weights_file(path)
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({str(err).splitlines()[0][:120]})") from None
    try:
        options = released_layout_options(tensors)
    except CheckpointError as err:
        raise CheckpointError(f"{file}: {err}") from None
    width = pipe.unet.config.cross_attention_dim
    trained_for = options.pop("cross_attention_dim")
    if trained_for != width:
        raise CheckpointError(
            f"{file} is an IP-Adapter for cross-attention width {trained_for}; this pipeline's U-Net has width "
            f"{width} (another base model)"
        )
    folder = encoder_path if encoder_path is not None else file.parent / ENCODER_FOLDER
    if not folder.is_dir():
        raise CheckpointError(f"no image encoder folder at {folder}: pass the IP-Adapter's CLIP image encoder")
    encoder = load_image_encoder(str(folder)).to(pipe.device)
    given = encoder_width(encoder, options.get("variant") == "plus")
    if given != options["image_embed_dim"]:
        raise CheckpointError(
            f"the image encoder in {folder} gives {given}-wide embeddings; {file} takes {options['image_embed_dim']}"
        )
    attach(pipe, "ip_adapter", **options, scale=scale)
    methods_of(pipe)[-1].load_diffusers_tensors(tensors, str(file))
    return f"ip_adapter ({file}, image encoder {folder})", encoder


def reference_embeds(pipe, encoder: nn.Module, reference):
    """The image prompt of the PIL image ``reference`` (:func:`image_prompt`: (1, dim), or for plus a pair of (1,
    patches, dim)), on the encoder's device."""
    pixels = image_processor(pipe, encoder)(images=reference, return_tensors="pt").pixel_values
    return image_prompt(encoder, pixels, is_plus(pipe))


class ImagePromptDenoiser(nn.Module):
    """The adapted pipeline modules, the frozen VAE and image encoder, with the denoising loss under each batch's
    image prompts."""

    def __init__(self, adapted: nn.Module, pipeline, encoder: nn.Module, objective: DiffusionObjective) -> None:
        super().__init__()
        self.adapted, self.vae, self.image_encoder, self.objective = adapted, pipeline.vae, encoder, objective
        self.__dict__["parts"] = DiffusionParts.from_pipeline(pipeline, cache_prompts=True, objective=objective)
        self.plus = is_plus(pipeline)

    def forward(self, batch: dict) -> torch.Tensor:
        pixels = batch["clip_pixel_values"]
        dropped = torch.as_tensor(batch["drop_image"], device=pixels.device)
        if self.plus:  # tutorial_train_plus.py lines 395-403: a black image, then the penultimate hidden states
            pixels = torch.where(dropped[:, None, None, None], torch.zeros_like(pixels), pixels)
            embeds = image_embeds(self.image_encoder, pixels, patches=True)
        else:  # tutorial_train.py lines 376-382: zero embeddings
            embeds = image_embeds(self.image_encoder, pixels)
            embeds = torch.where(dropped.to(embeds.device)[:, None], torch.zeros_like(embeds), embeds)
        with conditioning(self.adapted, ip_image_embeds=embeds):
            return diffusion_loss(self.parts, batch["pixel_values"], list(batch["prompt"]), objective=self.objective)


class ImagePromptValidation:
    """Samples the first ``train.validation_references`` training images as image prompts, each with its caption
    and alone (empty prompt); their grid (reference | with caption | image alone per row) goes to
    ``validation/NNN.png``. Samples are drawn as the run trains (its prediction type, zero terminal SNR)."""

    def __init__(self, pipeline, encoder, cfg: DictConfig, run_dir: Path, references) -> None:
        self.pipeline, self.encoder, self.cfg, self.run_dir, self.references = (
            pipeline,
            encoder,
            cfg,
            run_dir,
            references,
        )
        self.processor = image_processor(pipeline, encoder)
        use_trained_sampling(pipeline, objective_of(cfg.optim))
        self.calls = 0

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch)

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        self.calls += 1
        count = min(self.cfg.train.validation_references, len(self.references))
        if not accelerator.is_main_process or count == 0:
            return {}
        from diffusers.utils import make_image_grid

        rows = self.draw(accelerator, count)
        grid = make_image_grid([image for row in rows for image in row], rows=count, cols=3)
        folder = self.run_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"{self.calls:03d}.png")
        self.last_images = {"validation/reference | with caption | image alone": [grid]}
        return {}

    def draw(self, accelerator, count: int) -> list[list]:
        """[reference, sample with its caption, sample of the image alone] for the first ``count`` references."""
        rows = []
        for index in range(count):
            reference = self.references.reference(index)
            shown = reference.resize((self.cfg.data.size,) * 2)
            caption = self.references.captions[index]
            seed = self.cfg.train.seed
            rows.append([shown, *(self.sample(accelerator, reference, text, seed) for text in (caption, ""))])
        return rows

    def sample(self, accelerator, reference, prompt: str, seed: int):
        """One image of ``prompt`` with ``reference`` (a PIL image) as the image prompt, drawn with ``seed``."""
        size = self.cfg.data.size
        pixels = self.processor(images=reference, return_tensors="pt").pixel_values
        embeds = image_prompt(self.encoder, pixels.to(accelerator.device), is_plus(self.pipeline))
        self.pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with accelerator.autocast(), conditioning(self.pipeline, ip_image_embeds=embeds):
            return self.pipeline(
                prompt,
                num_inference_steps=self.cfg.train.validation_steps,
                guidance_scale=self.cfg.train.guidance_scale,
                guidance_rescale=self.cfg.train.guidance_rescale,
                generator=generator,
                height=size,
                width=size,
            ).images[0]


def training_images(config: DictConfig, processor, drops: PromptDrops | None = None):
    """The run's captioned images (``data.source``)."""
    data = config.data
    if data.source == "captioned_mix":
        return captioned_mix_image_prompts("train", data.size, processor, drops, seed=config.train.seed)
    if not data.root:
        raise ConfigError("data.root is required with data.source folder: a folder of captioned images")
    return folder_image_prompts(data.root, data.size, processor, drops)


class IPAdapterTrainer:
    def build(self, config: DictConfig, accelerator, run_dir: Path) -> Setup:
        data = config.data
        if data.drop_image + data.drop_text + data.drop_both > 1:
            raise ConfigError(
                f"data.drop_image + drop_text + drop_both is {data.drop_image + data.drop_text + data.drop_both:g}; "
                "they are shares of one draw and add up to at most 1"
            )
        pipeline = load_pipeline(config.model.name)
        encoder = load_image_encoder(config.model.image_encoder, config.model.image_encoder_subfolder)
        encoder.requires_grad_(False)
        processor = image_processor(pipeline, encoder)
        pairs = training_images(config, processor, PromptDrops(data.drop_image, data.drop_text, data.drop_both))
        knobs = objective_of(config.optim)
        check_objective(knobs, pipeline.scheduler, config.model.name)
        plus = any(options.get("variant") == "plus" for _, options in methods_of_config(config))
        methods = method_configs(config, {"image_embed_dim": encoder_width(encoder, plus)})
        check_embed_width(methods, encoder)
        attach(pipeline, methods)
        adapted = pipeline_modules(pipeline)
        if config.train.gradient_checkpointing:
            pipeline.unet.enable_gradient_checkpointing()
        shown = training_images(config, processor, PromptDrops(0.0, 0.0, 0.0))
        objective = ImagePromptValidation(pipeline, encoder, config, run_dir, shown)
        return Setup(
            ImagePromptDenoiser(adapted, pipeline, encoder, knobs),
            adapted,
            objective,
            pairs,
            frozen=[pipeline.unet, pipeline.text_encoder, pipeline.vae, encoder],
            loader={"num_workers": data.num_workers},
            summary=[
                f"{len(pairs)} captioned images ({data.source}), each its own image prompt; image encoder "
                f"{config.model.image_encoder} ({encoder_width(encoder, plus)}-wide "
                f"{'hidden states' if plus else 'embeddings'})"
            ],
            state={"pipeline": pipeline, "encoder": encoder},
        )

    def finish(self, config: DictConfig, loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        if not loop.accelerator.is_main_process:
            return {"outputs": []}
        pipeline, encoder = setup.state["pipeline"], setup.state["encoder"]
        outputs = [save_adapter(setup.adapted, run_dir / "adapter")]
        if can_export(pipeline, "diffusers"):  # ip_adapter/ip_adapter.safetensors (+ the other methods' files)
            outputs.append(save_adapter(pipeline, run_dir, format="diffusers"))
        if config.train.copy_image_encoder:
            folder = run_dir / EXPORT_FOLDER / ENCODER_FOLDER
            encoder.to(torch.float32).save_pretrained(folder, safe_serialization=True)
            outputs.append(folder)
        return {"outputs": outputs}


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Trains (see :func:`~.run.run_task` for the options); returns ``{"outputs": [paths], "steps": n, ...}``."""
    return run_task(IPAdapterTrainer(), config, run_dir, **options)
