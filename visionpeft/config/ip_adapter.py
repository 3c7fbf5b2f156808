"""The ``ip_adapter`` task's config: an IP-Adapter trained on (image, caption) pairs of a Stable Diffusion pipeline,
as tencent-ailab/IP-Adapter ``tutorial_train.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..schema import section, setting
from .diffusion_objective import DiffusionOptim
from .sections import SCHEDULES, TASK_HELP, DiffusersModel, TextToImageTrain


@dataclass
class IPAdapterModel(DiffusersModel):
    """``model``: the pipeline and the frozen CLIP image encoder (transformers' ``CLIPVisionModelWithProjection``)."""

    image_encoder: str = setting(
        "h94/IP-Adapter", "hub id or local folder of the CLIPVisionModelWithProjection image encoder", path="or_id"
    )
    image_encoder_subfolder: str | None = setting(
        "models/image_encoder", "the encoder's subfolder there (null: the folder itself)"
    )


@dataclass
class IPAdapterData:
    """``data``: captioned images, each its own image prompt."""

    source: str = setting(
        "folder",
        "folder (data.root: metadata.jsonl with image / text, or images with .txt captions) or captioned_mix "
        "(the embedded 32 px demo images, held-out subjects left out)",
        choices=("folder", "captioned_mix"),
    )
    root: str | None = setting(None, "the data folder (source folder)", path="folder")
    size: int = setting(512, "training resolution", min=8)
    drop_image: float = setting(0.05, "share of items trained without their image prompt (zero embeddings)", min=0)
    drop_text: float = setting(0.05, "share of items trained with an empty caption", min=0)
    drop_both: float = setting(0.05, "share of items trained without either", min=0)
    batch_size: int = setting(8, "images per optimizer step, whatever the number of processes and grad_accum", min=1)
    num_workers: int = setting(0, "DataLoader workers", min=0)


@dataclass
class IPAdapterOptim(DiffusionOptim):
    """``tutorial_train.py``: AdamW lr 1e-4, weight decay 1e-2 on every tensor (lines 207-211, 336-337), no
    schedule, no gradient clipping."""

    lr: float = setting(1e-4, "peak learning rate (see lr_scale_batch)", min=0)
    weight_decay: float = setting(1e-2, "weight decay (AdamW: decoupled)", min=0)
    bias_decay: bool = setting(True, "apply weight decay to biases and norm weights (1-D tensors) too")
    schedule: str = setting("constant", "learning-rate schedule after warmup", choices=SCHEDULES)
    steps: int | None = setting(10000, "run length in optimizer steps (or set epochs)", min=1)
    warmup_steps: int | None = setting(0, "linear warmup from 0, in optimizer steps (or warmup_epochs)", min=0)


@dataclass
class IPAdapterTrain(TextToImageTrain):
    output_dir: str = setting("runs/ip_adapter", "parent folder of run folders", path=True)
    validation_references: int = setting(
        2, "training images used as image prompts at each validation (with their caption, and alone)", min=0
    )
    guidance_scale: float = setting(7.5, "classifier-free guidance of validation samples", min=0)
    copy_image_encoder: bool = setting(
        True,
        "write the image encoder into RUN/ip_adapter/image_encoder, where pipe.load_ip_adapter looks (SD 1.5's "
        "ViT-H/14: 2.5 GB); false: load it yourself and pass image_encoder_folder=None",
    )


@dataclass
class IPAdapterConfig:
    """An IP-Adapter run on a Stable Diffusion 1.x / 2.x pipeline."""

    task: str = setting("ip_adapter", TASK_HELP)
    model: IPAdapterModel = section(IPAdapterModel, "the Stable Diffusion pipeline and the image encoder")
    method: Any = setting("ip_adapter", "a method name, {name: ..., options}, or a list of those")
    data: IPAdapterData = section(IPAdapterData, "the captioned images")
    optim: IPAdapterOptim = section(IPAdapterOptim, "optimizer and schedule")
    train: IPAdapterTrain = section(IPAdapterTrain, "run settings")
