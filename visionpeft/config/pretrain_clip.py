"""The ``pretrain_clip`` task's config: a tiny open_clip CLIP made from scratch on the embedded captioned images.

The model is open_clip's own ``CLIP`` built from ``model``'s widths (written as the run's ``open_clip_config.json``,
so the exported folder loads with open_clip alone); both towers train (method ``full``) with a contrastive loss
whose positives are the captions of the image's class (the data holds many images per class).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import section, setting
from .sections import SCHEDULES, TASK_HELP, OptimConfig, RunSettings


@dataclass
class TinyCLIPModel:
    """``model``: the widths of the CLIP built from scratch (open_clip ``CLIP``, random initialisation)."""

    image_size: int = setting(32, "image side in pixels", min=8)
    patch_size: int = setting(4, "vision patch side", min=1)
    vision_width: int = setting(128, "vision transformer width", min=8)
    vision_layers: int = setting(4, "vision transformer blocks", min=1)
    vision_head_width: int = setting(32, "vision attention head width", min=1)
    text_width: int = setting(64, "text transformer width (the 49,408-token embedding table dominates the file)", min=8)
    text_layers: int = setting(4, "text transformer blocks", min=1)
    text_heads: int = setting(4, "text attention heads", min=1)
    context_length: int = setting(32, "text positions (CLIP BPE tokens, start and end included)", min=4)
    embed_dim: int = setting(64, "width of the joint image-text embedding", min=1)
    temperature: float = setting(
        0.05, "fixed softmax temperature of image-text logits (stored as open_clip's logit_scale = log(1/T))", above=0
    )


@dataclass
class CLIPMixData:
    """``data``: the tiny CLIP's images (:mod:`visionpeft.demo.clip_mix`), train split only."""

    size: int = setting(32, "image side the data is drawn at (= model.image_size)", min=8)
    seed: int = setting(0, "the data's split and crop seed (not the run's)", min=0)
    batch_size: int = setting(128, "images per optimizer step, whatever the number of processes and grad_accum", min=1)
    eval_batch_size: int = setting(256, "validation batch", min=1)


@dataclass
class CLIPPretrainOptim(OptimConfig):
    lr: float = setting(1e-3, "peak learning rate (see lr_scale_batch)", min=0)
    weight_decay: float = setting(0.1, "weight decay (AdamW: decoupled)", min=0)
    schedule: str = setting("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    steps: int | None = setting(1000, "run length in optimizer steps (or set epochs)", min=1)
    warmup_steps: int | None = setting(100, "linear warmup from 0, in optimizer steps (or warmup_epochs)", min=0)
    clip_grad: float | None = setting(1.0, "max gradient norm (null: no clipping)", min=0)


@dataclass
class CLIPPretrainTrain(RunSettings):
    output_dir: str = setting("runs/pretrain", "parent folder of run folders", path=True)
    eval_every: int | None = setting(200, "zero-shot validation every N optimizer steps (and at the end)", min=1)


@dataclass
class PretrainCLIPConfig:
    """Pretraining of the tiny CLIP."""

    task: str = setting("pretrain_clip", TASK_HELP)
    model: TinyCLIPModel = section(TinyCLIPModel, "the CLIP's widths")
    method: str = setting("full", "what trains: full (every weight of both towers)", choices=("full",))
    data: CLIPMixData = section(CLIPMixData, "the captioned images")
    optim: CLIPPretrainOptim = section(CLIPPretrainOptim, "optimizer and schedule")
    train: CLIPPretrainTrain = section(CLIPPretrainTrain, "run settings")
