"""The ``control`` task's config: ControlNet / ControlNet-LoRA / T2I-Adapter on a Stable Diffusion (XL) pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..schema import section, setting
from .diffusion_objective import DiffusionOptim
from .personalization import PersonalizeModel
from .sections import SCHEDULES, TASK_HELP, TextToImageTrain


@dataclass
class ControlModel(PersonalizeModel):
    """``model``: the pipeline (see :class:`PersonalizeModel`) and a trained control to start from."""

    init_control: str | None = setting(
        None,
        "a diffusers ControlNet / T2I-Adapter folder the run's control starts from (a run's controlnet/ or a released "
        "one: train_controlnet.py's --controlnet_model_name_or_path); null: a fresh one",
        path="folder",
    )


@dataclass
class ControlData:
    """``data``: (image, condition, caption) triples: ``metadata.jsonl`` or fill50k's ``prompt.json``; several
    controls may each read a condition column of their own (``conditioning_columns``)."""

    root: str | None = setting(
        None, "the data folder (required): metadata.jsonl or prompt.json + images", path="folder"
    )
    size: int = setting(512, "training resolution (the condition too)", min=8)
    proportion_empty_prompts: float = setting(0.0, "share of captions replaced by an empty prompt", min=0, max=1)
    conditioning: str = setting(
        "none",
        "none (the pairs' condition images) or computed from each image",
        choices=("none", "canny", "grayscale", "blur"),
    )
    conditioning_columns: list[str] = setting(
        [],
        "metadata.jsonl columns of the condition images, one per control in the method list's order ([]: "
        "conditioning_image for every control)",
    )
    batch_size: int = setting(4, "images per optimizer step, whatever the number of processes and grad_accum", min=1)
    num_workers: int = setting(0, "DataLoader workers", min=0)


@dataclass
class ControlOptim(DiffusionOptim):
    """diffusers' ``train_controlnet.py``: AdamW, weight decay 1e-2 on every tensor, constant schedule, max grad
    norm 1; lr 1e-5 as its README commands."""

    lr: float = setting(1e-5, "peak learning rate (see lr_scale_batch)", min=0)
    weight_decay: float = setting(1e-2, "weight decay (AdamW: decoupled)", min=0)
    bias_decay: bool = setting(True, "apply weight decay to biases and norm weights (1-D tensors) too")
    schedule: str = setting("constant", "learning-rate schedule after warmup", choices=SCHEDULES)
    steps: int | None = setting(10000, "run length in optimizer steps (or set epochs)", min=1)
    warmup_steps: int | None = setting(0, "linear warmup from 0, in optimizer steps (or warmup_epochs)", min=0)
    clip_grad: float | None = setting(1.0, "max gradient norm (null: no clipping)", min=0)


@dataclass
class ControlTrain(TextToImageTrain):
    output_dir: str = setting("runs/control", "parent folder of run folders", path=True)
    validation_pairs: int = setting(2, "training pairs sampled at each validation (prompt + condition)", min=0)
    guidance_scale: float = setting(7.5, "classifier-free guidance of validation samples", min=0)
    timesteps: str = setting(
        "uniform", "training timesteps: uniform, or cubic (T2I-Adapter's (1 - u^3) T)", choices=("uniform", "cubic")
    )


@dataclass
class ControlConfig:
    """A control run on a Stable Diffusion 1.x / 2.x or XL pipeline."""

    task: str = setting("control", TASK_HELP)
    model: ControlModel = section(ControlModel, "the Stable Diffusion (XL) pipeline")
    method: Any = setting("controlnet", "a method name, {name: ..., options}, or a list of those")
    data: ControlData = section(ControlData, "the (image, condition, caption) triples")
    optim: ControlOptim = section(ControlOptim, "optimizer and schedule")
    train: ControlTrain = section(ControlTrain, "run settings")
