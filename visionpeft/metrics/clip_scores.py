"""Personalization metrics: CLIP-T (prompt alignment), CLIP-I (subject fidelity) and DINO similarity.

As defined by DreamBooth (Ruiz et al., CVPR 2023): CLIP-T is the mean cosine similarity between each generated
image and its prompt in CLIP space; CLIP-I the mean cosine similarity between generated and reference images in
CLIP image space; DINO the same with a self-supervised ViT's class token, which is more sensitive to identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

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


#: the CLIP ``visionpeft eval`` scores personalization samples with, when its weights are already on the machine
DEFAULT_CLIP = "ViT-B-32:openai"


def local_clip_scorer(spec: str | None = None) -> tuple[ClipScorer | None, str]:
    """A :class:`ClipScorer` of an open_clip model already on this machine, without downloading anything.

    Args:
        spec: ``NAME:TAG`` (open_clip's pretrained tag, used when its weights are in the local Hugging Face cache),
            ``NAME=FILE`` (a weights file), or ``none``; None means :data:`DEFAULT_CLIP`.

    Returns:
        ``(scorer, "NAME TAG")``, or ``(None, why there is none)``.
    """
    import open_clip

    from ..errors import ConfigError

    spec = spec or DEFAULT_CLIP
    if spec == "none":
        return None, "--clip none"
    name, is_file, weights = spec.partition("=")
    tag = None if is_file else name.partition(":")[2]
    name = name if is_file else name.partition(":")[0]
    if name not in open_clip.list_models():
        raise ConfigError(f"--clip {spec}: unknown open_clip model '{name}' (give NAME:TAG, NAME=FILE or none)")
    quick_gelu = False
    if not is_file:
        pretrained = open_clip.get_pretrained_cfg(name, tag or "")
        if not pretrained:
            raise ConfigError(f"--clip {spec}: open_clip has no pretrained tag '{tag}' for {name}")
        weights, quick_gelu = _cached_weights(pretrained.get("hf_hub", "")), bool(pretrained.get("quick_gelu"))
        if weights is None:
            return None, f"open_clip {name} '{tag}' weights are not on this machine (--clip NAME=FILE gives a file)"
    elif not Path(weights).is_file():
        raise ConfigError(f"--clip {spec}: {weights} does not exist")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, force_quick_gelu=quick_gelu)
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(name)), f"{name} {tag or weights}"


def _cached_weights(hub_id: str) -> str | None:
    """The local file of open_clip weights hosted in hub repository ``hub_id`` (None when not cached)."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_id.strip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename) if repo else None
        if isinstance(path, str):
            return path
    return None
