"""Personalization metrics: CLIP-T (prompt alignment), CLIP-I (subject fidelity) and DINO similarity.

As defined by DreamBooth (Ruiz et al., CVPR 2023): CLIP-T is the mean cosine similarity between each generated
image and its prompt in CLIP space; CLIP-I the mean cosine similarity between generated and reference images in
CLIP image space; DINO the same with a self-supervised ViT's class token, which is more sensitive to identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


class ClipScorer:
    """CLIP-T and CLIP-I with a given open_clip model.

    Args:
        model: An open_clip CLIP model.
        preprocess: Its eval image transform (from ``open_clip.create_model_and_transforms``).
        tokenizer: Text -> token tensor (``open_clip.get_tokenizer(name)``).
        batch_size: Images encoded at once.
    """

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, batch_size: int = 32) -> None:
        self.model, self.preprocess, self.tokenizer, self.batch_size = model.eval(), preprocess, tokenizer, batch_size

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        device = self.model.logit_scale.device
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start : start + self.batch_size]])
            out.append(F.normalize(self.model.encode_image(batch.to(device)).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.model.logit_scale.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def clip_t(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
        """Mean cosine similarity of each image with its own prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return float((self.image_features(images) * self.text_features(prompts)).sum(-1).mean())

    def clip_i(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
        """Mean cosine similarity over all (generated, reference) pairs."""
        return float((self.image_features(images) @ self.image_features(references).t()).mean())


@torch.no_grad()
def dino_similarity(
    model: nn.Module, preprocess: Callable, images: Sequence[Image.Image], references: Sequence[Image.Image]
) -> float:
    """Mean cosine similarity of a timm ViT's pooled features (DINO weights) over all pairs."""
    model = model.eval()

    def features(batch: Sequence[Image.Image]) -> torch.Tensor:
        x = torch.stack([preprocess(im.convert("RGB")) for im in batch])
        return F.normalize(model.forward_head(model.forward_features(x), pre_logits=True).float(), dim=-1)

    return float((features(images) @ features(references).t()).mean())
