"""The ``pretrain_text_to_image`` task's config: a tiny latent diffusion pipeline made from scratch.

Two stages in one run: the VAE (``vae``: its own short loop, saved in ``RUN/vae``, skipped on resume once saved),
then the U-Net (+ the text encoder, unless frozen) with the shared loop on the denoising loss. With
``model.init_from`` a run continues an exported pipeline instead (no VAE stage; its record carries the earlier ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..schema import section, setting
from .diffusion_objective import DiffusionOptim
from .sections import SCHEDULES, TASK_HELP, TextToImageTrain


@dataclass
class TinySDModel:
    """``model``: the widths of the pipeline built from scratch (diffusers classes, random initialisation)."""

    family: str = setting(
        "sd",
        "sd: a StableDiffusionPipeline (VAE stage, U-Net, CLIP); flux: a FluxPipeline whose VAE and CLIP come from "
        "model.base (frozen), with a fresh T5 encoder and Flux transformer trained on the flow-matching loss",
        choices=("sd", "flux"),
    )
    image_size: int = setting(32, "image side in pixels", min=8)
    vae_channels: list[int] = setting([32, 64], "AutoencoderKL block widths; the latent is image_size / 2^(n-1)")
    latent_channels: int = setting(4, "latent channels", min=1)
    unet_channels: list[int] = setting([32, 64, 128], "U-Net block widths (the first block has no attention)")
    layers_per_block: int = setting(1, "resnets per U-Net / VAE block", min=1)
    attention_head_dim: int = setting(8, "U-Net attention head width", min=1)
    text_width: int = setting(64, "CLIP text encoder width (= the U-Net's cross_attention_dim)", min=8)
    text_layers: int = setting(2, "CLIP text encoder layers", min=1)
    text_heads: int = setting(4, "CLIP text encoder heads", min=1)
    max_tokens: int = setting(16, "tokenizer model_max_length (= text positions)", min=4)
    train_text_encoder: bool = setting(True, "train the text encoder with the U-Net (false: frozen random)")
    base: str | None = setting(
        "checkpoints/tiny_sd",
        "flux: the pretrained tiny SD pipeline whose VAE and CLIP text encoder + tokenizer are reused, frozen",
        path="folder",
    )
    double_layers: int = setting(3, "flux: double-stream (joint) transformer blocks", min=1)
    single_layers: int = setting(3, "flux: single-stream transformer blocks", min=0)
    heads: int = setting(4, "flux: attention heads of the transformer", min=1)
    head_dim: int = setting(32, "flux: width of each transformer head (width = heads x head_dim)", min=4)
    t5_width: int = setting(64, "flux: T5 encoder width (= the transformer's joint_attention_dim)", min=8)
    t5_layers: int = setting(2, "flux: T5 encoder layers", min=1)
    t5_heads: int = setting(4, "flux: T5 encoder heads", min=1)
    t5_feed_forward: int = setting(128, "flux: T5 gated-GELU feed-forward width", min=8)
    init_from: str | None = setting(
        None,
        "continue from a pipeline folder this tool exported (its VAE, U-Net, text "
        "encoder and tokenizer; the widths above are then the folder's and the VAE stage "
        "is skipped); null: from scratch",
        path="folder",
    )


@dataclass
class VAEStage:
    """``vae``: the autoencoder's own short training before the U-Net's."""

    steps: int = setting(500, "optimizer steps", min=1)
    lr: float = setting(1e-3, "AdamW learning rate (cosine to 0)", min=0)
    batch_size: int = setting(64, "images per step", min=1)
    kl_weight: float = setting(1e-5, "weight of the KL term against the pixel MSE", min=0)


@dataclass
class MixData:
    """``data``: the captioned mix (:mod:`visionpeft.demo.captioned_mix`)."""

    exclude: list[str] = setting(["digit 7", "texture brick"], "held-out subjects, never seen in pretraining")
    options: dict[str, Any] = setting({}, "extra keyword arguments of captioned_mix (per_texture, circles, ...)")
    caption_dropout: float = setting(0.1, "share of captions replaced by '' (classifier-free guidance)", min=0, max=1)
    batch_size: int = setting(64, "images per optimizer step, whatever the number of processes and grad_accum", min=1)


@dataclass
class PretrainOptim(DiffusionOptim):
    lr: float = setting(5e-4, "peak learning rate (see lr_scale_batch)", min=0)
    weight_decay: float = setting(0.01, "weight decay (AdamW: decoupled)", min=0)
    schedule: str = setting("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    steps: int | None = setting(3000, "run length in optimizer steps (or set epochs)", min=1)
    warmup_steps: int | None = setting(200, "linear warmup from 0, in optimizer steps (or warmup_epochs)", min=0)
    clip_grad: float | None = setting(1.0, "max gradient norm (null: no clipping)", min=0)
    snr_gamma: float | None = setting(5.0, "min-SNR-gamma loss weighting (null: plain MSE)", above=0)


@dataclass
class PretrainTrain(TextToImageTrain):
    output_dir: str = setting("runs/pretrain", "parent folder of run folders")
    ema_decay: float | None = setting(0.999, "EMA of the trained weights; null: none", min=0, max=1)
    validation_steps: int = setting(20, "DDIM steps of validation grids", min=1)
    guidance_scale: float = setting(
        3.0, "classifier-free guidance of validation grids (and the shipped default)", min=0
    )


@dataclass
class PretrainTextToImageConfig:
    """Pretraining of the tiny text-to-image pipeline."""

    task: str = setting("pretrain_text_to_image", TASK_HELP)
    model: TinySDModel = section(TinySDModel, "the pipeline's widths")
    method: Any = setting("full", "what trains: full (every weight of the U-Net / text encoder)", choices=("full",))
    vae: VAEStage = section(VAEStage, "the autoencoder stage")
    data: MixData = section(MixData, "the captioned images")
    optim: PretrainOptim = section(PretrainOptim, "optimizer and schedule of the U-Net stage")
    train: PretrainTrain = section(PretrainTrain, "run settings")
