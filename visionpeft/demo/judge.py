"""The judge of the tiny text-to-image pipeline: a classifier, trained by the project, that names the subject of a
32 px image (the captioned mix's 24 subjects, held-out ones included), and KID on its features.

No hub model is involved: the judge is the FractalDB-pretrained tiny ViT fully fine-tuned on the real images
(``configs/pretrain/tiny_sd_judge.yaml``), saved as ``checkpoints/tiny_sd_judge.safetensors`` whose metadata says
how to rebuild it (timm architecture, classes, normalisation). torchmetrics' ``KernelInceptionDistance`` needs
Inception weights from the hub unless given a feature module, so :func:`kid` hands it the judge's pre-logit
features: the same unbiased polynomial-kernel MMD (Binkowski et al. 2018), on features that exist offline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

JUDGE_FILE = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny_sd_judge.safetensors"


class Judge(nn.Module):
    """A timm ViT classifier with its classes and input normalisation; inputs are uint8 images."""

    def __init__(
        self, model: nn.Module, classes: list[str], mean: Sequence[float], std: Sequence[float], size: int
    ) -> None:
        super().__init__()
        self.model, self.classes, self.size = model.eval(), list(classes), size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, path: str | Path = JUDGE_FILE) -> Judge:
        """Rebuilds the judge from its safetensors file (architecture and classes are in the metadata)."""
        import timm
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k).float() for k in f.keys()}
        classes, arch = json.loads(meta["classes"]), json.loads(meta["model"])
        model = timm.create_model(
            arch["name"], pretrained=False, num_classes=len(classes), img_size=arch["img_size"], **arch["kwargs"]
        )
        model.load_state_dict(state)
        return cls(model, classes, json.loads(meta["mean"]), json.loads(meta["std"]), arch["img_size"])

    def to_tensor(self, images) -> torch.Tensor:
        """PIL images, a uint8 array (N, H, W, 3) or a uint8 tensor (N, 3, H, W) -> normalised float (N, 3, S, S)."""
        if isinstance(images, torch.Tensor):
            x = images.float() / 255
        else:
            if not isinstance(images, np.ndarray):
                images = np.stack(
                    [np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC)) for im in images]
                )
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
        if x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def logits(self, images, batch: int = 256) -> torch.Tensor:
        x = self.to_tensor(images)
        return torch.cat([self.model(x[i : i + batch]) for i in range(0, len(x), batch)])

    def predict(self, images) -> list[str]:
        """The subject named for each image."""
        return [self.classes[i] for i in self.logits(images).argmax(-1).tolist()]

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        """Pre-logit features (N, width): what KID compares."""
        x = self.to_tensor(images)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def kid(
    judge: Judge, real: np.ndarray, generated: np.ndarray, subset_size: int = 50, subsets: int = 50, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two uint8 image sets (N, H, W, 3) on the judge's features, with
    torchmetrics' ``KernelInceptionDistance`` (cubic polynomial kernel); ``subset_size`` is capped by the sets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    torch.manual_seed(seed)
    size = min(subset_size, len(real), len(generated))
    metric = KernelInceptionDistance(feature=judge, subsets=subsets, subset_size=size)
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(generated).permute(0, 3, 1, 2), real=False)
    mean, std = metric.compute()
    return float(mean), float(std)
