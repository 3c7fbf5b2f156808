"""Pretraining of the tiny CLIP (task ``pretrain_clip``): open_clip's own ``CLIP`` from scratch on the embedded images.

The run first writes ``RUN/model/open_clip_config.json`` (``model_cfg`` from ``model``'s widths, ``preprocess_cfg``:
OpenAI's image statistics, bicubic) and builds the model with ``open_clip.create_model("local-dir:RUN/model")`` - the
very call that loads the finished folder - so what trains is what open_clip rebuilds. Both towers train (method
``full``) with the shared loop; the temperature is fixed (``model.temperature``).

The loss is CLIP's symmetric contrastive loss with class-level positives (UniCL, Yang et al. 2022): an image's
positives are every caption of its class in the batch and a caption's positives every image of its class (the data
hold many images per class, which plain CLIP's one-positive targets would push apart). Captions are each image's
class name in a template of :data:`~.clip_mix.TEMPLATES` drawn at every step; the batch's distinct captions are
encoded once. Validation is zero-shot top-1 on the val split (:func:`zero_shot_accuracy`), held-in and held-out
classes apart. ``finish`` writes ``RUN/model/open_clip_model.safetensors`` (fp32) and ``RUN/model/training.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

import visionpeft as vp

from ..trainers.classification import Transformed
from ..trainers.logs import get_logger
from ..trainers.run import Setup, run_task
from .clip_mix import (
    HELD_OUT_PAIRS,
    HELD_OUT_SUBJECTS,
    SUBSETS,
    TEMPLATES,
    clip_mix,
    held_out_classes,
    pretraining_images,
)

logger = get_logger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
#: the CLIP BPE vocabulary shipped with open_clip
VOCAB_SIZE = 49408


def open_clip_config(model: DictConfig) -> dict[str, Any]:
    """``open_clip_config.json`` of the widths in ``model`` (the layout of open_clip's hub folders)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {
        "model_cfg": {
            "embed_dim": model.embed_dim,
            "init_logit_scale": math.log(1 / model.temperature),
            "vision_cfg": {
                "image_size": model.image_size,
                "patch_size": model.patch_size,
                "width": model.vision_width,
                "layers": model.vision_layers,
                "head_width": model.vision_head_width,
            },
            "text_cfg": {
                "context_length": model.context_length,
                "vocab_size": VOCAB_SIZE,
                "width": model.text_width,
                "heads": model.text_heads,
                "layers": model.text_layers,
            },
        },
        "preprocess_cfg": {
            "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def load_folder(folder: Path) -> nn.Module:
    """The CLIP of an open_clip folder (``open_clip_config.json`` + weights, if any), as open_clip loads it."""
    import open_clip

    return open_clip.create_model(f"local-dir:{folder}")


def eval_transform(clip: nn.Module):
    """open_clip's evaluation transform of the model (resize, center crop, normalise)."""
    import open_clip

    visual = clip.visual
    return open_clip.image_transform(visual.image_size, is_train=False, mean=visual.image_mean, std=visual.image_std)


@torch.no_grad()
def zero_shot_accuracy(
    clip: nn.Module, split: str, templates=TEMPLATES[:1], seed: int = 0, batch_size: int = 256
) -> dict[str, float]:
    """Zero-shot top-1 (%) of ``clip`` on ``split`` of both subsets of :func:`~.clip_mix.clip_mix`, each classified
    among all its classes: ``subjects/held_in``, ``subjects/held_out``, ``circles/held_in``, ``circles/held_out``
    (the class-balanced accuracy is not used: every class of a subset has the same images per split up to one)."""
    from ..tasks.clip_classifier import CLIPClassifier

    was_training = clip.training
    clip.eval()
    results = {}
    for subset in SUBSETS:
        data = clip_mix(split, subset=subset, seed=seed)
        classifier = CLIPClassifier(clip, data.classes, templates).eval()
        loader = torch.utils.data.DataLoader(Transformed(data, eval_transform(clip)), batch_size=batch_size)
        predicted = torch.cat([classifier(images).argmax(-1) for images, _ in loader]).numpy()
        labels = np.array(data.targets)
        held_out = np.isin(labels, held_out_classes(subset))
        for name, mask in (("held_in", ~held_out), ("held_out", held_out)):
            results[f"{subset}/{name}"] = float(100 * (predicted[mask] == labels[mask]).mean())
    clip.train(was_training)
    return results


class ClassContrastiveCLIP(nn.Module):
    """The CLIP plus the tokens of every (class, template) caption; forward is the batch's contrastive loss."""

    def __init__(self, clip: nn.Module, classes: list[str]) -> None:
        super().__init__()
        from ..backbones.open_clip import clip_tokenize

        self.clip = clip
        captions = [template.format(name) for name in classes for template in TEMPLATES]
        self.register_buffer("tokens", clip_tokenize(captions, clip.context_length), persistent=False)

    def forward(self, batch) -> torch.Tensor:
        images, labels = batch
        drawn = labels * len(TEMPLATES) + torch.randint(len(TEMPLATES), labels.shape)
        captions, _ = torch.unique(drawn, return_inverse=True)
        image_features = F.normalize(self.clip.encode_image(images), dim=-1)
        text_features = F.normalize(self.clip.encode_text(self.tokens[captions]), dim=-1)
        logits = self.clip.logit_scale.exp() * image_features @ text_features.T
        positives = (labels[:, None] == (captions // len(TEMPLATES))[None, :]).float()
        return (soft_cross_entropy(logits, positives) + soft_cross_entropy(logits.T, positives.T)) / 2


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row's logits against the uniform distribution over its positives."""
    targets = positives / positives.sum(-1, keepdim=True)
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


class ZeroShotValidation:
    """Loss through the wrapper; evaluation: zero-shot top-1 on the val split (single template)."""

    metric = "subjects/held_in"

    def __init__(self, clip: nn.Module, seed: int, batch_size: int) -> None:
        self.clip, self.seed, self.batch_size = clip, seed, batch_size

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch)

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        if not accelerator.is_main_process:
            return {}
        return zero_shot_accuracy(self.clip, "val", seed=self.seed, batch_size=self.batch_size)


class PretrainCLIPTrainer:
    """Writes the model's open_clip config, builds it through open_clip, trains both towers with the shared loop."""

    def build(self, config: DictConfig, accelerator, run_dir: Path) -> Setup:
        from ..errors import ConfigError

        if config.data.size != config.model.image_size:
            raise ConfigError(f"data.size ({config.data.size}) must equal model.image_size ({config.model.image_size})")
        folder = run_dir / "model"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(open_clip_config(config.model), indent=2) + "\n")
        images = pretraining_images(config.data.size, config.data.seed)
        torch.manual_seed(config.train.seed)
        clip = load_folder(folder)
        vp.attach(clip, [("full", {"tower": "vision"}), ("full", {"tower": "text"})])
        clip.logit_scale.requires_grad_(False)
        summary = [
            f"{len(images)} train images of {len(set(images.targets))} classes at {config.data.size} px, "
            f"{len(TEMPLATES)} caption templates; held out: {', '.join(HELD_OUT_SUBJECTS)} and "
            f"{len(HELD_OUT_PAIRS)} colour pairs",
        ]
        return Setup(
            ClassContrastiveCLIP(clip, images.classes),
            clip,
            ZeroShotValidation(clip, config.data.seed, config.data.eval_batch_size),
            Transformed(images, eval_transform(clip)),
            loader={"drop_last": True},
            summary=summary,
            state={"clip": clip, "images": len(images), "classes": len(set(images.targets))},
        )

    def finish(self, config: DictConfig, loop, setup: Setup, run_dir: Path) -> dict[str, Any]:
        clip = setup.state["clip"]
        result = {"images": setup.state["images"], "classes": setup.state["classes"]}
        if not loop.accelerator.is_main_process:
            return result
        vp.merge(clip)  # full training: the weights are the model
        folder = run_dir / "model"
        state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        record = {**result, "steps": loop.step, "zero_shot_val": zero_shot_accuracy(clip, "val", seed=config.data.seed)}
        (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        return {**result, "outputs": [folder]}


def run(config: DictConfig, run_dir: Path, **options: Any) -> dict[str, Any]:
    """Pretrains (see :func:`~.run.run_task` for the options); returns ``{"outputs": [RUN/model], ...}``."""
    return run_task(PretrainCLIPTrainer(), config, run_dir, **options)
